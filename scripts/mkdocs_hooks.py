"""mkdocs hook: the repository files the docs link to (`../src/...`, `../tests/...`) are copied into the site.

The pages link to source files with relative paths, so that the same link works on GitHub, in an editor and
in tests/test_docs.py. mkdocs only knows the files under docs/; this hook adds each linked file that exists
to the site under `repo/`, so `mkdocs build --strict` resolves those links, and still fails on a link whose
target does not exist.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

# a Markdown link target that climbs out of docs/: [text](../path) or [text](../path#anchor)
OUTSIDE_LINK = re.compile(r"\]\((\.\./[^)#\s]+)(?:#[^)\s]*)?\)")


def on_files(files: Files, config) -> Files:
    docs_dir = Path(config["docs_dir"])
    for page in list(files.documentation_pages()):
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        for target in sorted(set(OUTSIDE_LINK.findall(text))):
            src_uri = posixpath.normpath(posixpath.join(posixpath.dirname(page.src_uri), target))
            path = (docs_dir / src_uri).resolve()
            if not path.is_file() or path.suffix == ".md" or files.get_file_from_path(src_uri) is not None:
                continue  # missing: mkdocs reports the broken link; .md: it would be built as a page
            linked = File(
                src_uri, src_dir=str(docs_dir), dest_dir=config["site_dir"], use_directory_urls=False
            )
            linked.dest_uri = "repo/" + posixpath.relpath(src_uri, "..")
            linked.inclusion = InclusionLevel.INCLUDED
            files.append(linked)
    return files
