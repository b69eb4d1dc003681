"""Turn calibration documents into batches of token ids with a registered preprocessor.

A preprocessor maps `(documents, tokenizer, n_samples, seq_len, seed)` to
`(input_ids LongTensor[n_samples, seq_len], attention_mask LongTensor[n_samples, seq_len] | None)`.
New ones are added with `@register_preproc("name")` without touching other code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from llmc.errors import DataError

Preprocessor = Callable[[Sequence[str], Any, int, int, int], tuple[torch.Tensor, "torch.Tensor | None"]]
PREPROCESSORS: dict[str, Preprocessor] = {}


def register_preproc(name: str, *aliases: str) -> Callable[[Preprocessor], Preprocessor]:
    """Register the decorated function as preprocessor `name` (and under each alias)."""

    def decorator(fn: Preprocessor) -> Preprocessor:
        for key in (name, *aliases):
            if key in PREPROCESSORS and PREPROCESSORS[key] is not fn:
                raise ValueError(f"preprocessor '{key}' is already registered")
            PREPROCESSORS[key] = fn
        return fn

    return decorator


def _token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize `text` with the tokenizer's default special tokens; return a 1-D LongTensor."""
    return tokenizer(text, return_tensors="pt").input_ids[0].long()


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


@register_preproc("general", "random_truncate_txt")
def general(
    documents: Sequence[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, None]:
    """GPTQ-style: join documents with "\\n\\n", tokenize once, draw random `seq_len` windows."""
    ids = _token_ids(tokenizer, "\n\n".join(documents))
    if ids.numel() < seq_len + 1:
        raise DataError(
            f"calibration text has {ids.numel()} tokens, fewer than calib.seq_len + 1 = {seq_len + 1}; "
            "lower calib.seq_len or use more calibration documents"
        )
    gen = torch.Generator().manual_seed(seed)
    # Starts in [0, numel - seq_len - 1], as GPTQ's random.randint(0, numel - seq_len - 1).
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()]), None


@register_preproc("padded_docs", "padding")
def padded_docs(
    documents: Sequence[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One document per sample (seeded random order), truncated to `seq_len`, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((n_samples, seq_len), pad, dtype=torch.long)
    mask = torch.zeros((n_samples, seq_len), dtype=torch.long)
    row = 0
    for index in torch.randperm(len(documents), generator=gen).tolist():
        if row == n_samples:
            break
        if not documents[index].strip():
            continue
        ids = _token_ids(tokenizer, documents[index])[:seq_len]
        if ids.numel() == 0:
            continue
        input_ids[row, : ids.numel()] = ids
        mask[row, : ids.numel()] = 1
        row += 1
    if row < n_samples:
        raise DataError(
            f"only {row} non-empty calibration documents for calib.n_samples = {n_samples} with "
            "preproc padded_docs; lower calib.n_samples or add documents"
        )
    return input_ids, mask


def build_calibration(
    documents: Sequence[str],
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    bs: int,
    preproc: str = "general",
    seed: int = 42,
) -> list[dict[str, torch.Tensor | None]]:
    """Build calibration batches `{"input_ids": [b, seq_len], "attention_mask": [b, seq_len] | None}`.

    `bs == -1` gives one batch of all samples; otherwise the last batch may be smaller.
    """
    if preproc not in PREPROCESSORS:
        raise DataError(
            f"unknown calibration preproc '{preproc}'; set calib.preproc to one of "
            f"{', '.join(sorted(PREPROCESSORS))}"
        )
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise DataError(f"calib.n_samples must be an integer >= 1 (got {n_samples!r}); set calib.n_samples")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"calib.seq_len must be an integer >= 2 (got {seq_len!r}); set calib.seq_len")
    if isinstance(bs, bool) or not isinstance(bs, int) or (bs < 1 and bs != -1):
        raise DataError(f"calib.bs must be a positive integer or -1 for one batch (got {bs!r}); set calib.bs")
    if not any(doc.strip() for doc in documents):
        raise DataError("no calibration documents (all are empty); set calib.path to a file with text")
    input_ids, mask = PREPROCESSORS[preproc](documents, tokenizer, n_samples, seq_len, seed)
    step = n_samples if bs == -1 else bs
    return [
        {
            "input_ids": input_ids[i : i + step],
            "attention_mask": None if mask is None else mask[i : i + step],
        }
        for i in range(0, n_samples, step)
    ]
