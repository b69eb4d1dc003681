"""Perplexity under one fixed protocol, recorded beside every number llmc reports.

Protocol (the GPTQ/AWQ WikiText-2 convention): the test text is `"\\n\\n".join(rows)` of
the WikiText-2 raw test split; it is tokenized once with the model's tokenizer (its
default special tokens; no BOS is inserted per window); the token stream is cut into
non-overlapping windows of `seq_len` tokens (the tail shorter than a window is dropped;
optionally only the first `max_windows`); each window is scored independently, every
token but the window's first predicted from the tokens before it; PPL = exp(token-level
mean negative log-likelihood over all scored tokens), computed in float32.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmc.models.adapter import ModelAdapter
from llmc.pipeline.blockwise import BlockwisePipeline, check_finite
from llmc.pipeline.capture import capture_block_inputs
from llmc.pipeline.offload import on_device

PROTOCOL = (
    "non-overlapping windows of seq_len tokens over the tokenized text (tail dropped); "
    "wikitext2 text = '\\n\\n'.join(test rows); no BOS per window; first token of each window unscored; "
    "ppl = exp(token-level mean NLL), float32"
)


@dataclass
class PplResult:
    dataset: str
    position: str
    ppl: float
    nll: float
    tokens_scored: int
    windows: int
    seq_len: int
    seconds: float
    protocol: str = PROTOCOL

    def as_dict(self) -> dict:
        return asdict(self)


def window_nll(logits: Tensor, ids: Tensor) -> tuple[float, int]:
    """Summed NLL (float64 accumulate) and count of next-token predictions inside each window."""
    logits = logits[:, :-1].float()
    labels = ids[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return float(nll.double()), labels.numel()


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    adapter: ModelAdapter,
    windows: Tensor,
    device: torch.device,
    bs: int = 1,
    inference_per_block: bool = False,
    dataset: str = "custom",
    position: str = "pretrain",
    progress: bool = True,
) -> PplResult:
    start = time.perf_counter()
    batches = [windows[i : i + bs] for i in range(0, windows.shape[0], bs)]
    if inference_per_block:
        nll, count = _streamed_nll(model, adapter, batches, device, progress)
    else:
        nll, count = _direct_nll(model, batches, device, progress, f"ppl {dataset} [{position}]")
    mean = nll / count
    return PplResult(
        dataset=dataset,
        position=position,
        ppl=math.exp(mean),
        nll=mean,
        tokens_scored=count,
        windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        seconds=time.perf_counter() - start,
    )


def _direct_nll(
    model: nn.Module, batches: list[Tensor], device: torch.device, progress: bool, desc: str
) -> tuple[float, int]:
    total, count = 0.0, 0
    with on_device(model, device):
        for ids in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            logits = model(input_ids=ids.to(device), use_cache=False).logits
            check_finite([logits], "of the model's logits during evaluation")
            nll, n = window_nll(logits, ids)
            total, count = total + nll, count + n
    return total, count


def _streamed_nll(
    model: nn.Module, adapter: ModelAdapter, batches: list[Tensor], device: torch.device, progress: bool
) -> tuple[float, int]:
    """Logits of a model larger than the device: every window through one block at a time."""
    hidden = stream_hidden_states(model, adapter, batches, device, progress)
    total, count = 0.0, 0
    for ids, h in zip(batches, hidden):
        logits = apply_head(model, adapter, h.to(device), device)
        check_finite([logits], "of the model's logits during evaluation")
        nll, n = window_nll(logits, ids)
        total, count = total + nll, count + n
    return total, count


def stream_hidden_states(
    model: nn.Module, adapter: ModelAdapter, batches: list[Tensor], device: torch.device, progress: bool = False
) -> list[Tensor]:
    inputs = capture_block_inputs(model, adapter, [{"input_ids": b, "attention_mask": None} for b in batches], device)
    pipeline = BlockwisePipeline(model, adapter, device, progress=progress, desc="eval blocks")
    return pipeline.run(inputs).hidden


def apply_head(model: nn.Module, adapter: ModelAdapter, hidden: Tensor, device: torch.device) -> Tensor:
    """The adapter's head (final norm, projections, LM head, soft cap), with its modules on `device`."""
    with contextlib.ExitStack() as stack:
        for module in adapter.head_modules(model):
            stack.enter_context(on_device(module, device))
        return adapter.apply_head(model, hidden)
