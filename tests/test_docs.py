"""The README and docs/ as a map that holds: links resolve, every command has its page and its README row,
docs/measured.md is what docs/gen_measured.py makes of benchmarks/results/ now, and CI's test command is
the README's. Reads files only (no mkdocs, no model)."""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(path: Path) -> str:
    """The Markdown outside fenced code blocks (a `](` in a code sample is not a link)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def _slugs(heading: str) -> set[str]:
    """The anchors a heading gets: Python-Markdown's (mkdocs) and GitHub's, which differ on punctuation runs."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    ascii_ = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    mkdocs = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_).strip().lower())
    github = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
    return {mkdocs, github}


def _anchors(path: Path) -> set[str]:
    return set().union(*(_slugs(h) for h in HEADING.findall(_prose(path))))


def _links() -> list[tuple[Path, str]]:
    out = []
    for page in [README, *PAGES]:
        for target in LINK.findall(_prose(page)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked here
                out.append((page, target))
    return out


def _commands() -> list[str]:
    from moegraft.cli import app

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("page,target", _links(), ids=lambda x: x.name if isinstance(x, Path) else x)
def test_relative_link_resolves(page: Path, target: str):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.relative_to(ROOT)}: link to {target}, but {path} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), (
            f"{page.relative_to(ROOT)}: no heading in {dest.name} gives #{anchor}"
        )


def test_every_command_has_a_page_a_readme_row_and_a_nav_entry():
    readme = README.read_text(encoding="utf-8")
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    commands = _commands()
    assert len(commands) >= 10, commands  # plan, convert, demo, train, finetune, compare, eval, bench, ...
    for name in commands:
        assert (DOCS / f"{name}.md").is_file(), f"moegraft {name} has no docs/{name}.md"
        assert f"| [`moegraft {name}`](docs/{name}.md) |" in readme, (
            f"README's command table has no row for {name}"
        )
        assert re.search(rf":\s*{name}\.md\s*$", nav, re.M), f"mkdocs.yml's nav does not list {name}.md"


def test_every_page_is_in_the_mkdocs_nav():
    nav = set(re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M))
    assert nav == {p.name for p in PAGES}


def test_measured_page_is_what_gen_measured_makes_of_the_results_now():
    spec = importlib.util.spec_from_file_location("gen_measured", DOCS / "gen_measured.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.render()
    assert text == gen.render()  # deterministic
    assert (DOCS / "measured.md").read_text(encoding="utf-8") == text, (
        "docs/measured.md is out of date: run python docs/gen_measured.py"
    )


def test_readme_is_a_map():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move the detail to docs/"
    assert max(map(len, lines)) <= 200  # no 700-character table rows


def test_readme_holds_the_test_command_ci_runs():
    # .ci/run says it runs "the README's test command"; the README's quick start must show that command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_command = re.search(r"^python3? -m pytest[^\n#]*$", ci, re.M).group(0).strip()
    readme_command = ci_command.replace("python3 ", "python ", 1)
    quick_start = README.read_text(encoding="utf-8").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"^{re.escape(readme_command)}(\s|$)", quick_start, re.M), readme_command
