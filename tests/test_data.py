"""Tests for llmc.data: readers, bundled data, calibration preprocessors and eval windows."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from llmc.data import (
    PREPROCESSORS,
    build_calibration,
    bundled_path,
    load_eval_text,
    load_named_documents,
    read_documents,
    register_preproc,
    tokenize_windows,
    wikitext2_test_text_from_raw,
)
from llmc.errors import DataError

WIKI_TEST_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold.",
    "Hello world, this is a calibration document.",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer trained in-process; adds a BOS token like many LLMs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>"],
    )
    tok.train_from_iterator(DOCS * 5, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _assert_fix(err: pytest.ExceptionInfo, *words: str) -> None:
    """The message is one line, has a problem part and a fix part, and names `words`."""
    msg = str(err.value)
    assert "\n" not in msg and ";" in msg, msg
    for word in words:
        assert word in msg, msg


# ---------------------------------------------------------------- sources


def test_read_txt_skips_blank_lines_keeps_spaces(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text(" first doc \n\n   \nsecond\r\nthird", encoding="utf-8")
    assert read_documents(f) == [" first doc ", "second", "third"]


def test_read_json_objects_and_strings(tmp_path: Path) -> None:
    (tmp_path / "o.json").write_text(json.dumps([{"text": "a"}, {"text": "b", "id": 1}]))
    (tmp_path / "s.json").write_text(json.dumps(["x", "y"]))
    assert read_documents(tmp_path / "o.json") == ["a", "b"]
    assert read_documents(tmp_path / "s.json") == ["x", "y"]


def test_read_jsonl_and_gz_and_text_key(tmp_path: Path) -> None:
    lines = "\n".join(json.dumps({"body": t}) for t in ["one", "two"]) + "\n\n"
    (tmp_path / "d.jsonl").write_text(lines)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as f:
        json.dump([{"body": "three"}], f)
    with gzip.open(tmp_path / "lines.json.gz", "wt", encoding="utf-8") as f:
        f.write(lines)  # C4 ships JSON lines under a .json.gz name
    assert read_documents(tmp_path / "d.jsonl", text_key="body") == ["one", "two"]
    assert read_documents(tmp_path / "d.jsonl.gz", text_key="body") == ["one", "two"]
    assert read_documents(tmp_path / "d.json.gz", text_key="body") == ["three"]
    assert read_documents(tmp_path / "lines.json.gz", text_key="body") == ["one", "two"]


def test_read_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert read_documents(tmp_path / "d.parquet") == ["p1", "p2"]
    with pytest.raises(DataError) as err:
        read_documents(tmp_path / "d.parquet", text_key="body")
    _assert_fix(err, "body", "text, n", "text_key")


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError) as err:
        read_documents(f)
    _assert_fix(err, "pip install pyarrow")


def test_read_folder_sorted_supported_only(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("from b\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    assert read_documents(tmp_path) == ["from a", "from b"]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_documents(tmp_path / "nope.jsonl", config_key="calib.path")
    _assert_fix(err, "nope.jsonl", "not found", "set calib.path")


def test_unsupported_extension(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text("a,b\n")
    with pytest.raises(DataError) as err:
        read_documents(f)
    _assert_fix(err, "unsupported", ".jsonl.gz", ".parquet")


def test_missing_text_field_lists_fields(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "x", "url": "u"}) + "\n")
    with pytest.raises(DataError) as err:
        read_documents(f)
    _assert_fix(err, "'text'", "content, url", "set text_key")


def test_bad_json_and_empty(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError) as err:
        read_documents(tmp_path / "bad.jsonl")
    _assert_fix(err, "line 2")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError) as err:
        read_documents(tmp_path / "empty.txt")
    _assert_fix(err, "no documents")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError) as err:
        read_documents(tmp_path / "empty_dir")
    _assert_fix(err, "no supported data files")


def test_wikitext2_join_matches_protocol_sha256() -> None:
    raw = bundled_path("wikitext2", "eval").read_bytes().decode("utf-8")
    text = wikitext2_test_text_from_raw(raw)
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == WIKI_TEST_SHA256
    assert load_eval_text("wikitext2") == text


def test_calibration_never_uses_test_split() -> None:
    assert bundled_path("wikitext2", "calib").name == "wiki.valid.tokens"
    assert bundled_path("wikitext2", "eval").name == "wiki.test.raw"
    docs = load_named_documents("wikitext2", "calib")
    test_text = bundled_path("wikitext2", "eval").read_text(encoding="utf-8")
    assert docs[0].strip() == "= Homarus gammarus ="  # first heading of the validation split
    assert docs[0].strip() not in test_text
    assert all(d.strip() for d in docs)


def test_bundled_c4_and_no_bundled_copy() -> None:
    docs = load_named_documents("c4", "calib")
    assert len(docs) == 1000 and all(docs)
    for name in ("pileval", "ptb"):
        with pytest.raises(DataError) as err:
            load_named_documents(name, "calib")
        _assert_fix(err, name, "calib.path", "calib.download: true")
    with pytest.raises(DataError) as err:
        load_named_documents("custom", "calib")
    _assert_fix(err, "calib.path")
    with pytest.raises(DataError) as err:
        load_named_documents("openwebtext", "calib")
    _assert_fix(err, "pileval, c4, wikitext2, ptb, custom")


def test_named_documents_from_path(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    assert load_named_documents("pileval", "calib", path=f) == ["a", "b"]
    with pytest.raises(DataError) as err:
        load_named_documents("pileval", "calib", path=tmp_path / "missing.txt")
    _assert_fix(err, "set calib.path")


def test_download_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError) as err:
        load_named_documents("pileval", "calib", download=True)
    _assert_fix(err, "pip install datasets")


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset) -> list:
    calls: list = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=recorder))
    return calls


def test_download_uses_llmc_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_datasets(monkeypatch, lambda *a, **k: {"text": ["r1", "", "r2"], "sentence": ["s1", "s2"]})
    assert load_named_documents("wikitext2", "calib", download=True) == ["r1", "", "r2"]
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})
    assert load_named_documents("ptb", "calib", download=True) == ["s1", "s2"]
    assert calls[-1] == (("ptb_text_only", "penn_treebank"), {"split": "train"})
    load_named_documents("c4", "calib", download=True)
    assert calls[-1][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    load_named_documents("pileval", "calib", download=True)
    assert calls[-1] == (("mit-han-lab/pile-val-backup",), {"split": "validation"})
    assert load_eval_text("wikitext2", download=True) == "r1\n\n\n\nr2"
    assert calls[-1][1] == {"split": "test"}
    assert load_eval_text("ptb", download=True) == "s1 s2"
    load_eval_text("c4", download=True)
    assert calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_download_network_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub\nmore detail")

    _fake_datasets(monkeypatch, fail)
    with pytest.raises(DataError) as err:
        load_named_documents("c4", "calib", download=True)
    _assert_fix(err, "unreachable", "calib.download: false", "calib.path")


# ---------------------------------------------------------------- calibration


def test_general_windows_deterministic(tokenizer) -> None:
    docs = DOCS * 4
    a = build_calibration(docs, tokenizer, n_samples=6, seq_len=8, bs=-1, seed=1)
    b = build_calibration(docs, tokenizer, n_samples=6, seq_len=8, bs=-1, seed=1)
    c = build_calibration(docs, tokenizer, n_samples=6, seq_len=8, bs=-1, seed=2)
    assert len(a) == 1 and a[0]["input_ids"].shape == (6, 8)
    assert a[0]["input_ids"].dtype == torch.long and a[0]["attention_mask"] is None
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    full = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0].tolist()
    for row in a[0]["input_ids"].tolist():  # every sample is a contiguous window of the joined text
        assert any(full[i : i + 8] == row for i in range(len(full) - 8))
    assert build_calibration(docs, tokenizer, 6, 8, -1, preproc="random_truncate_txt", seed=1)[0][
        "input_ids"
    ].equal(a[0]["input_ids"])


def test_general_too_short(tokenizer) -> None:
    with pytest.raises(DataError) as err:
        build_calibration(["hi"], tokenizer, n_samples=1, seq_len=64, bs=1)
    _assert_fix(err, "calib.seq_len")


def test_batches_last_smaller(tokenizer) -> None:
    batches = build_calibration(DOCS * 4, tokenizer, n_samples=5, seq_len=4, bs=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]


def test_padded_docs_masks(tokenizer) -> None:
    docs = ["", *DOCS, "   "]
    batches = build_calibration(docs, tokenizer, n_samples=5, seq_len=20, bs=-1, preproc="padded_docs")
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    assert ids.shape == mask.shape == (5, 20) and mask.dtype == torch.long
    rows = set()
    for r in range(5):
        n = int(mask[r].sum())
        assert mask[r, :n].all() and not mask[r, n:].any()  # ones then zeros
        assert (ids[r, n:] == tokenizer.eos_token_id).all()  # no pad token: falls back to eos
        rows.add(tuple(ids[r, :n].tolist()))
    lengths = sorted(len(tokenizer(d).input_ids) for d in DOCS)
    assert lengths[0] < 20 < lengths[-1]  # some rows are padded, some truncated
    assert sorted(int(n) for n in mask.sum(1)) == [min(n, 20) for n in lengths]
    assert rows == {tuple(tokenizer(d).input_ids[:20]) for d in DOCS}
    again = build_calibration(docs, tokenizer, 5, 20, 2, preproc="padding")
    assert torch.equal(torch.cat([b["input_ids"] for b in again]), ids)
    with pytest.raises(DataError) as err:
        build_calibration(docs, tokenizer, n_samples=6, seq_len=20, bs=-1, preproc="padded_docs")
    _assert_fix(err, "calib.n_samples")


def test_calibration_argument_errors(tokenizer) -> None:
    with pytest.raises(DataError) as err:
        build_calibration(DOCS, tokenizer, 2, 8, 1, preproc="nope")
    _assert_fix(err, "nope", "general", "padded_docs", "calib.preproc")
    for kwargs, key in (
        ({"n_samples": 0, "seq_len": 8, "bs": 1}, "calib.n_samples"),
        ({"n_samples": 2, "seq_len": 1, "bs": 1}, "calib.seq_len"),
        ({"n_samples": 2, "seq_len": 8, "bs": 0}, "calib.bs"),
    ):
        with pytest.raises(DataError) as err:
            build_calibration(DOCS, tokenizer, **kwargs)
        _assert_fix(err, key)


def test_register_preproc(tokenizer) -> None:
    @register_preproc("test_zeros", "test_zeros_alias")
    def zeros(documents, tok, n_samples, seq_len, seed):
        return torch.zeros((n_samples, seq_len), dtype=torch.long), None

    try:
        out = build_calibration(DOCS, tokenizer, 3, 4, -1, preproc="test_zeros_alias")
        assert out[0]["input_ids"].sum() == 0
        with pytest.raises(ValueError):
            register_preproc("general")(zeros)
    finally:
        PREPROCESSORS.pop("test_zeros")
        PREPROCESSORS.pop("test_zeros_alias")


# ---------------------------------------------------------------- evaluation


def test_tokenize_windows_counts(tokenizer) -> None:
    text = " ".join(DOCS * 3)
    n_tokens = tokenizer(text, return_tensors="pt").input_ids.numel()
    w = tokenize_windows(text, tokenizer, seq_len=16)
    assert w.shape == (n_tokens // 16, 16) and w.dtype == torch.long
    assert w[0, 0].item() == tokenizer.bos_token_id  # tokenizer default special tokens kept
    assert tokenize_windows(text, tokenizer, seq_len=16, max_windows=2).shape == (2, 16)
    assert tokenize_windows(text, tokenizer, seq_len=16, max_windows=10**6).shape[0] == n_tokens // 16
    with pytest.raises(DataError) as err:
        tokenize_windows("hi", tokenizer, seq_len=4096)
    _assert_fix(err, "eval.seq_len")


def test_eval_text_variants(tmp_path: Path) -> None:
    joined = tmp_path / "wiki_joined.txt"
    joined.write_text(" a \n\n b \n", encoding="utf-8")
    assert load_eval_text("wikitext2", path=joined) == " a \n\n b \n"  # taken as is
    folder = tmp_path / "wt"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(" \n = T = \n \n x \n", encoding="utf-8")
    assert load_eval_text("wikitext2", path=folder) == "\n\n = T = \n\n\n\n\n x \n"
    with pytest.raises(DataError) as err:
        load_eval_text("wikitext2", path=tmp_path / "nothing")
    _assert_fix(err, "eval.path")

    c4 = load_eval_text("c4")
    docs = read_documents(bundled_path("c4", "eval"))
    assert c4 == " ".join(docs[:1100])

    ptb = tmp_path / "ptb.test.txt"
    ptb.write_text("s one\ns two\n")
    assert load_eval_text("ptb", path=ptb) == "s one s two"
    with pytest.raises(DataError) as err:
        load_eval_text("ptb")
    _assert_fix(err, "eval.path", "eval.download: true")

    assert load_eval_text("custom", path=ptb) == "s one\n\ns two"
    with pytest.raises(DataError) as err:
        load_eval_text("custom")
    _assert_fix(err, "eval.path")
    with pytest.raises(DataError) as err:
        load_eval_text("lambada")
    _assert_fix(err, "wikitext2, c4, ptb, custom")
