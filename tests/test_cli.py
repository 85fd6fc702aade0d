"""End-to-end CLI: real subprocesses, one clean error line, exit codes, no output left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "moegraft.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_plan_and_convert(tmp_path, tiny_llama):
    p = run("plan", tiny_llama, "--experts", 4, "--top-k", 2, "--expert-size", 32, "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["moe"]["total_params"] > report["dense"]["total_params"]
    c = run("convert", tiny_llama, tmp_path / "moe", "-E", 4, "-K", 2, "-I", 32, "--no-progress")
    assert c.returncode == 0, c.stderr
    assert "wrote" in c.stdout and (tmp_path / "moe" / "config.json").is_file()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-E", 2, "-K", 3], "--top-k 3 > --experts 2"),
        (["-I", 0], "--expert-size must be > 0"),
        (["--format", "gemma4"], "--format gemma4"),
        (["--layers", "7"], "layer 7 does not exist"),
    ],
)
def test_bad_spec_is_one_line(tmp_path, tiny_llama, args, needle):
    r = run("convert", tiny_llama, tmp_path / "out", *args, "--no-progress")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_sources_are_one_line(tmp_path, tiny_llama):
    (tmp_path / "exists").mkdir()
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\0" * 64)
    cases = [
        ([tiny_llama, tmp_path / "exists"], "already exists"),
        ([tmp_path / "nowhere", tmp_path / "o1"], "no such directory"),
        ([bad_gguf, tmp_path / "o2"], "bad.gguf"),
        ([tmp_path, tmp_path / "o3"], "no config.json"),
    ]
    for args, needle in cases:
        r = run("convert", *args, "--no-progress")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, r.stderr)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_source_without_tokenizer_is_one_line_and_the_fixes_work(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    src = tmp_path / "src"  # the weights and config of tiny_llama, no tokenizer
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(tiny_llama / name, src / name)
    grafts = ("convert", "-E", 4, "-K", 2, "-I", 32, "--no-progress")
    r = run(grafts[0], src, tmp_path / "out", *grafts[1:])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in (
        "src: no tokenizer",
        "calibration",
        "--calib-tokenizer",
        "--router-init random --init zero",
    ):
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    # a carve always calibrates: the one fix named is the tokenizer
    r = run(
        "convert",
        src,
        tmp_path / "out",
        "--init",
        "carve",
        "--shared-size",
        32,
        "-E",
        4,
        "-K",
        2,
        "--no-progress",
    )
    assert r.returncode == 2 and "--calib-tokenizer" in r.stderr and "--init zero" not in r.stderr, r.stderr
    # --calib-tokenizer: the same output as the source with that tokenizer beside it, tokenizer included
    r = run(grafts[0], src, tmp_path / "with", *grafts[1:], "--calib-tokenizer", tiny_llama)
    assert r.returncode == 0, r.stderr
    r = run(grafts[0], tiny_llama, tmp_path / "ref", *grafts[1:])
    assert r.returncode == 0, r.stderr
    got, want = (load_file(tmp_path / d / "model.safetensors") for d in ("with", "ref"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "with" / "tokenizer.json").read_text() == (tiny_llama / "tokenizer.json").read_text()
    # a --calib-tokenizer that does not load is named as such
    r = run(grafts[0], src, tmp_path / "bad", *grafts[1:], "--calib-tokenizer", src)
    assert r.returncode == 2 and r.stderr.startswith("error: --calib-tokenizer"), r.stderr
    # no calibration: no tokenizer needed
    r = run(grafts[0], src, tmp_path / "plain", *grafts[1:], "--router-init", "random", "--init", "zero")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "module,needle",
    [
        ("lm_eval", "pip install 'moegraft[eval]'"),
        ("llama_cpp", "pip install 'moegraft[export]'"),
        ("peft", "`peft` is missing (moegraft requires it); reinstall with `pip install moegraft`"),
    ],
)
def test_missing_package_is_one_line(monkeypatch, module, needle):
    # a command whose import fails as it would without the package: one line naming the install, exit 2
    from typer.testing import CliRunner

    from moegraft import cli

    def needs_it():
        __import__(module)

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    monkeypatch.setattr(cli, "app", cli.typer.Typer())
    cli.app.command("x")(cli.clean_errors(needs_it))
    cli.app.command("y")(lambda: None)
    r = CliRunner().invoke(cli.app, ["x"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
    assert "Traceback" not in r.output


def test_every_command_has_help():
    # what a fresh `pip install moegraft` must offer: each pipeline command imports and shows its help
    from typer.testing import CliRunner

    from moegraft.cli import app

    for cmd in (
        [],
        ["plan"],
        ["convert"],
        ["train"],
        ["finetune"],
        ["compare"],
        ["eval"],
        ["bench"],
        ["export"],
    ):
        r = CliRunner().invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, (cmd, r.output[-500:])
