"""Text in, packed token blocks out: .txt files/folders, .jsonl (text or chat messages), .parquet, datasets.

Also the embedded default corpus: real English prose from the Python standard library's docstrings,
which every Python install carries (no download).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from moegraft.errors import MoegraftError
from moegraft.io.source import hub_name

# Standard-library modules whose docstrings are long, plain English prose (stable across 3.10-3.13).
STDLIB_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "http.server",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "pydoc",
    "queue",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tkinter",
    "turtle",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)


def stdlib_prose(min_chars: int = 200) -> list[str]:
    """Docstrings (module, class, function) of STDLIB_MODULES, in a fixed order, deduplicated."""
    return list(_stdlib_prose(min_chars))


@functools.lru_cache(maxsize=4)  # importing ~50 modules and walking them takes a second; calibration re-reads
def _stdlib_prose(min_chars: int) -> tuple[str, ...]:
    seen: set[str] = set()
    docs: list[str] = []
    for mod_name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # e.g. tkinter without Tk: skip, the corpus stays large
            continue
        objs = [mod] + [
            obj for _, obj in sorted(vars(mod).items()) if inspect.isclass(obj) or inspect.isfunction(obj)
        ]
        for obj in objs:
            for o in [obj] + (
                [m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
                if inspect.isclass(obj)
                else []
            ):
                doc = inspect.getdoc(o)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return tuple(docs)


def reference_prose() -> list[str]:
    """The Python Language Reference's topics (pydoc_data, shipped with CPython for `help()`), in topic order:
    real prose of another kind than docstrings, for a second domain with no download."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


# embedded corpora: name -> documents
_CORPORA = {"stdlib": stdlib_prose, "reference": reference_prose}


def stdlib_split(heldout_fraction: float = 0.1, corpus: str = "stdlib") -> tuple[list[str], list[str]]:
    """(train, heldout) documents of an embedded corpus: every k-th document is held out."""
    docs = _CORPORA[corpus]()
    k = max(2, round(1 / heldout_fraction))
    return [d for i, d in enumerate(docs) if i % k], [d for i, d in enumerate(docs) if not i % k]


def read_texts(source: str | Path, *, tokenizer=None, keep_messages: bool = False) -> list:
    """Documents from a path or dataset name.

    Args:
        source: "stdlib[:train|:heldout]" (the standard library's docstrings) or "reference[:train|:heldout]"
            (the Python Language Reference), both embedded in Python; a .txt file or folder of
            them, a .jsonl/.json file (`text` field, or chat `messages` rendered with the tokenizer's chat
            template), a .csv/.tsv or .parquet file (`text` column), or a datasets name ("name[:config][@split]")
            when it cannot be a local path. Other file types, and binary files, are refused.
        tokenizer: needed for chat `messages`.
        keep_messages: return a chat row as its `messages` list (for `pack_masked`) instead of rendered text.
    """
    s = str(source)
    corpus, _, part = s.partition(":")
    if corpus in _CORPORA and part in ("", "train", "heldout"):
        train, heldout = stdlib_split(corpus=corpus)
        return {"": train + heldout, "train": train, "heldout": heldout}[part]
    p = Path(s).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FOLDER_SUFFIXES)
        if not files:
            raise MoegraftError(f"{p}: no {'/'.join(FOLDER_SUFFIXES)} files inside")
        return [t for f in files for t in read_texts(f, tokenizer=tokenizer, keep_messages=keep_messages)]
    if p.is_file():
        return _read_file(p, tokenizer, keep_messages)
    # not here: a hub dataset only if it cannot be a local path typed wrong (SourceError names the path if not)
    name = hub_name(s.partition("@")[0].partition(":")[0], "file or folder", single=True)
    return _hub_dataset(s, name)


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
# read from a folder: not .json/.csv, which a data folder may hold as metadata (dataset_info.json, ...)
FOLDER_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".parquet")
KNOWN = "give .txt/.md/.rst text, .jsonl/.json rows with `text` or `messages`, .csv/.tsv with a `text` column, or .parquet"


def _read_file(p: Path, tokenizer, keep_messages: bool) -> list:
    """One data file's documents, by its type; an unknown type or a binary file is refused in one line."""
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = [_json_line(line, p, i) for i, line in enumerate(p.read_text().splitlines()) if line.strip()]
    elif suffix == ".json":
        rows = _json_rows(p)
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(p, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return [str(t) for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]
        except (KeyError, ValueError) as e:
            raise MoegraftError(f"{p}: needs a `text` column ({str(e).splitlines()[0]})") from None
    elif suffix in TEXT_SUFFIXES or not suffix:
        return [_plain_text(p)]
    else:
        raise MoegraftError(f"{p}: unknown data file type {p.suffix!r}; {KNOWN} (rename plain text to .txt)")
    return [_row_text(row, p, i, tokenizer, keep_messages) for i, row in enumerate(rows)]


def _plain_text(p: Path) -> str:
    raw = p.read_bytes()
    if b"\0" in raw[:65536]:  # text has no NUL bytes; model weights, archives and images do
        raise MoegraftError(f"{p}: a binary file, not text; {KNOWN}")
    return raw.decode("utf-8", errors="replace")


def _json_line(line: str, path: Path, i: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise MoegraftError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
    return row


def _json_rows(p: Path) -> list:
    """A .json file: an array of rows, or (as datasets' json loader also accepts) one row per line."""
    text = p.read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise MoegraftError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return [_json_line(line, p, i) for i, line in enumerate(text.splitlines()) if line.strip()]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise MoegraftError(f"{p}: a .json data file holds an array of rows with `text` or `messages`")
    return doc


def _csv_rows(p: Path, delimiter: str) -> list[dict]:
    import csv

    with p.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if "text" not in (reader.fieldnames or []):
            raise MoegraftError(f"{p}: needs a `text` column (columns: {reader.fieldnames})")
        return list(reader)


def _row_text(row, path: Path, i: int, tokenizer, keep_messages: bool = False) -> str | list[dict]:
    if not isinstance(row, dict):
        raise MoegraftError(f"{path}: row {i + 1} is not an object with a `text` or `messages` field")
    if "text" in row:
        return str(row["text"])
    if "messages" in row:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise MoegraftError(f"{path}: chat `messages` need a tokenizer with a chat template")
        if keep_messages:
            return list(row["messages"])
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    raise MoegraftError(f"{path}:{i + 1}: a row needs a `text` or `messages` field")


def _hub_dataset(spec: str, name: str) -> list[str]:
    import datasets

    _, _, split = spec.partition("@")
    config = spec.partition("@")[0].partition(":")[2]
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:
        raise MoegraftError(
            f"{spec}: no such local file or folder; as a hub dataset: cannot load it ({str(e).splitlines()[0]})"
        ) from None
    if "text" not in ds.column_names:
        raise MoegraftError(f"{spec}: the dataset has no `text` column (columns: {ds.column_names})")
    return [str(t) for t in ds["text"]]


def pack(texts: Iterable[str], tokenizer, seq_len: int, *, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize documents, join them with EOS, and cut into (N, seq_len) blocks (the ragged tail is dropped)."""
    return pack_masked(texts, tokenizer, seq_len, max_blocks=max_blocks)[0]


def assistant_mask(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a chat rendered with the tokenizer's chat template, and which of them the assistant wrote.

    The assistant's span of turn i is what rendering messages[:i+1] adds to messages[:i] with the generation
    prompt (its content and end-of-turn marker), so this works for any template whose renderings of a
    conversation's prefixes are prefixes of each other; no `{% generation %}` tags are needed.
    """

    def render(msgs: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    text = render(messages)
    spans: list[tuple[int, int]] = []  # character ranges of assistant text in `text`
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        before, upto = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise MoegraftError(
                "the chat template does not render a conversation's turns as prefixes of each other; "
                "cannot find the assistant tokens (use plain `text` rows or --loss-mask all)"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def pack_masked(
    docs: Iterable[str | list[dict]], tokenizer, seq_len: int, *, max_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `pack`, with a loss mask: (ids (N, T), mask (N, T) bool).

    A chat (a `messages` list) counts only its assistant tokens; a plain text counts all of its tokens and the EOS
    that ends it.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for d in docs:
        if isinstance(d, str):
            t = tokenizer(d, add_special_tokens=False)["input_ids"]
            m = [True] * len(t)
        else:
            t, m = assistant_mask(d, tokenizer)
        ids.extend(t)
        mask.extend(m)
        if eos is not None:
            ids.append(eos)
            mask.append(isinstance(d, str))  # a chat's end-of-turn marker already ends it
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise MoegraftError(f"the data gives {len(ids)} tokens, fewer than one block of --seq-len {seq_len}")
    return (
        torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len),  # (N, T)
        torch.tensor(mask[: n * seq_len], dtype=torch.bool).view(n, seq_len),  # (N, T)
    )
