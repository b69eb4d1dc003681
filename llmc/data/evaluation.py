"""Perplexity evaluation text, joined as the GPTQ/AWQ protocol does, and its token windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmc.data.sources import (
    bundled_path,
    download_documents,
    read_documents,
    wikitext2_test_text_from_raw,
)
from llmc.errors import DataError

EVAL_NAMES: tuple[str, ...] = ("wikitext2", "c4", "ptb", "custom")
# GPTQ evaluates C4 on the first 1100 validation documents joined with a space.
C4_EVAL_DOCS = 1100
_KEY = "eval.path"


def _read_file_text(path: Path) -> str:
    """Read a whole UTF-8 file, keeping its newlines as they are."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"cannot read {path} ({type(e).__name__}: {e}); set {_KEY} to a readable UTF-8 text file"
        ) from None


def _wikitext2_text(path: str | Path | None) -> str:
    """WikiText-2 test text from a local `wiki.test.raw`, a pre-joined text file, or the bundled copy."""
    if path is None:
        file = bundled_path("wikitext2", "eval")
    else:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "wiki.test.raw"
        if not file.is_file():
            raise DataError(
                f"wikitext2 eval file {file} not found; set {_KEY} to wiki.test.raw (or a folder "
                "holding it, or an already-joined text file), or leave it unset for the bundled copy"
            )
    text = _read_file_text(file)
    # `.raw` is the original WikiText file; anything else is taken as already-joined test text.
    if file.name.lower().endswith(".raw"):
        text = wikitext2_test_text_from_raw(text)
    if not text.strip():
        raise DataError(f"wikitext2 eval file {file} is empty; set {_KEY} to a file with text")
    return text


def load_eval_text(name: str, path: str | Path | None = None, download: bool = False) -> str:
    """Return the evaluation text of data set `name`, joined as GPTQ/AWQ do.

    wikitext2: test rows joined "\\n\\n"; c4: first 1100 documents joined " ";
    ptb: test sentences joined " "; custom (needs `path`): documents joined "\\n\\n".
    """
    if name not in EVAL_NAMES:
        raise DataError(f"unknown eval data set '{name}'; set eval.name to one of {', '.join(EVAL_NAMES)}")
    if name == "custom":
        if download or path is None:
            raise DataError(
                "'custom' eval data needs a local file; set eval.path to a file or folder "
                "and eval.download: false"
            )
        return "\n\n".join(read_documents(path, config_key=_KEY))
    if name == "wikitext2":
        if download:
            return "\n\n".join(download_documents("wikitext2", "eval"))
        return _wikitext2_text(path)
    if download:
        docs = download_documents(name, "eval")
    elif path is not None:
        docs = read_documents(path, config_key=_KEY)
    else:
        docs = read_documents(bundled_path(name, "eval"), config_key=_KEY)
    if name == "c4":
        docs = docs[:C4_EVAL_DOCS]
    return " ".join(docs)


def tokenize_windows(text: str, tokenizer: Any, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize `text` once and cut it into non-overlapping `seq_len` windows (the tail is dropped).

    Returns a LongTensor `[n, seq_len]`, `n = min(tokens // seq_len, max_windows)`.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"eval.seq_len must be an integer >= 1 (got {seq_len!r}); set eval.seq_len")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise DataError(
            f"eval max windows must be an integer >= 1 (got {max_windows!r}); set it to a positive "
            "integer or leave it unset to use all windows"
        )
    ids = tokenizer(text, return_tensors="pt").input_ids.reshape(-1).long()
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(
            f"eval text has {ids.numel()} tokens, fewer than eval.seq_len = {seq_len}; "
            "lower eval.seq_len or use a longer eval text"
        )
    return ids[: n * seq_len].reshape(n, seq_len)
