"""Bad and odd inputs: missing paths named as paths (a hub id only when it cannot be one, and then said so),
data files read by their type or refused in one line, the tokenizer checked before any weight is written."""

from __future__ import annotations

import json

import pytest

from moegraft.data import read_texts
from moegraft.errors import MoegraftError, SourceError
from moegraft.io.source import hub_name, open_source, read_config


@pytest.fixture
def offline(monkeypatch):
    # read at import, so set on the imported modules too: no test waits for network timeouts
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


@pytest.mark.parametrize(
    "src,needle",
    [
        ("./nowhere", "no such directory (a local path, so not tried as a hub id)"),
        ("models/nowhere", "no such directory in models/ (a local path, so not tried as a hub id)"),
        ("owner/model.gguf", "no such GGUF file"),
        ("owner/config.json", "(a local path, so not tried as a hub id)"),
        ("a/b/c", "no such directory, and not a hub id of the form owner/name"),
        ("just-a-name", "no such directory, and not a hub id of the form owner/name"),
    ],
)
def test_missing_model_path_is_named_as_a_path(tmp_path, monkeypatch, src, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/nowhere` is then a mistyped local path, never a hub id
    with pytest.raises(SourceError) as e:
        open_source(src)
    assert str(e.value).startswith(f"{src}: ") and needle in str(e.value) and "\n" not in str(e.value)


def test_hub_id_is_tried_only_when_it_cannot_be_local_and_says_so(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    for fn in (open_source, read_config):
        with pytest.raises(SourceError, match="no such local directory; as a hub id"):
            fn("moegraft-test/not-a-model")
    from moegraft.models import load_causal_lm

    with pytest.raises(SourceError, match="no such local directory; as a hub id: cannot load model"):
        load_causal_lm("moegraft-test/not-a-model")
    (tmp_path / "moegraft-test").mkdir()
    with pytest.raises(SourceError, match="a local path, so not tried"):
        load_causal_lm("moegraft-test/not-a-model")
    assert hub_name("wikitext", "file", single=True) == "wikitext"


def test_missing_data_path_is_named_and_hub_tried_only_for_names(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    for src in ("corpus/missing", "missing.txt", "./missing", "data.json"):
        with pytest.raises(SourceError, match=rf"^{src}: no such file or folder"):
            read_texts(src)
    # a bare name that is nothing here: tried as a hub dataset, and the message says both
    with pytest.raises(MoegraftError, match="^not-here: no such local file or folder; as a hub dataset"):
        read_texts("not-here")


def test_data_files_by_type(tmp_path):
    rows = [{"text": "first document"}, {"text": "second, with a comma"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON lines in a .json
    (tmp_path / "c.csv").write_text('id,text\n1,first document\n2,"second, with a comma"\n')
    (tmp_path / "d.tsv").write_text("text\tid\nfirst document\t1\nsecond, with a comma\t2\n")
    for name in ("a.json", "b.json", "c.csv", "d.tsv"):
        assert read_texts(tmp_path / name) == ["first document", "second, with a comma"], name
    (tmp_path / "README").write_text("plain text without a suffix")
    assert read_texts(tmp_path / "README") == ["plain text without a suffix"]


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("notes.py", b"print('hi')", "unknown data file type '.py'"),
        ("weights.txt", b"\x00\x01\x02binary", "a binary file, not text"),
        ("blob", b"PK\x03\x04\x00\x00", "a binary file, not text"),
        ("x.csv", b"id,body\n1,hello\n", "needs a `text` column"),
        ("x.json", b'{"text": ', "not valid JSON"),
        ("y.json", b"[1, 2]", "row 1 is not an object"),
    ],
)
def test_bad_data_files_are_one_line(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MoegraftError) as e:
        read_texts(tmp_path / name)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_is_checked_before_any_weight_is_written(tmp_path, tiny_llama, monkeypatch):
    # a source whose tokenizer cannot be written (GGUFSource raises this when transformers cannot rebuild it)
    from moegraft.config import GraftSpec
    from moegraft.convert import convert
    from moegraft.io import source, writer

    written = []
    monkeypatch.setattr(writer.ShardedWriter, "write", lambda self, name, t: written.append(name))

    def no_tokenizer(self, out_dir):
        raise SourceError(f"{self.path}: transformers cannot rebuild the tokenizer")

    monkeypatch.setattr(source.DirSource, "copy_aux", no_tokenizer)
    spec = GraftSpec(num_experts=2, top_k=1, expert_size=16, init="zero", router_init="random")
    with pytest.raises(SourceError, match="tokenizer"):
        convert(str(tiny_llama), tmp_path / "out", spec, progress=False)
    assert written == [] and list(tmp_path.iterdir()) == []
