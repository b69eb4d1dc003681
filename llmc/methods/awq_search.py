"""AWQ's recording of what its searches need (`llmc.methods.awq`): per group of linears that share
an input, the inspect module's calls in the searched batches, the input's mean |x| per channel
(the scale search) or a sample of evenly spaced input rows (the clip search), and, in
data-parallel runs, those statistics combined over the ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmc.pipeline import distributed
from llmc.pipeline.blockwise import BlockContext, ModuleCall


@dataclass
class GroupRecord:
    """What one group's searches use, from one recording forward of the block."""

    calls: list[ModuleCall]
    """The inspect module's calls in the search batches."""
    masks: list[Tensor | None]
    """The token masks of those calls (None: all tokens are real, or the shapes do not match)."""
    x_mean: Tensor | None = None
    """Mean |input| per channel of the group, over every real calibration token (float32)."""
    sample: Tensor | None = None
    """About `clip_tokens` evenly spaced real input rows of the search batches (float32)."""


def search_batches(ctx: BlockContext, limit: int | None) -> int:
    """How many leading calibration batches (of this process) hold at most `limit` real tokens (at least one)."""
    count = len(ctx.inputs)
    tokens = (ctx.inputs.batch_tokens(i) for i in range(count))
    return count if limit is None else distributed.leading_batches(tokens, limit)


@dataclass(frozen=True)
class SearchSpan:
    """The searched batches as this process holds them: its leading `batches` searched, the real tokens
    of the searched batches on the ranks before it (`offset`) and of all of them (`total`)."""

    batches: int
    offset: int
    total: int


def search_span(ctx: BlockContext, limit: int | None) -> SearchSpan:
    if not distributed.is_distributed():
        n = search_batches(ctx, limit)
        return SearchSpan(n, 0, sum(ctx.inputs.batch_tokens(i) for i in range(n)))
    tokens = [ctx.inputs.batch_tokens(i) for i in range(len(ctx.inputs))]
    return SearchSpan(*distributed.leading_share(tokens, limit))


@contextlib.contextmanager
def _recording(
    ctx: BlockContext, groups: list[tuple[str, dict[str, nn.Module]]], span: SearchSpan, clip_tokens: int
) -> Iterator[list[GroupRecord]]:
    """Record, during the block forwards run in this context, per (inspect module, group linears):
    the inspect module's calls in the searched batches, and either the group input's mean
    |x| over all batches (`clip_tokens=0`, the scale search) or a sample of `clip_tokens` input
    rows of the searched batches (the clip search). The list is filled on exit (data-parallel: with
    the means and samples of all ranks)."""
    records: list[GroupRecord] = []
    searched = span.batches
    firsts = [next(iter(mods)) for _, mods in groups]
    sums = {n: _MeanAbs() for n in firsts} if not clip_tokens else {}
    samples = {n: _Sampler(span.total, clip_tokens, ctx.device, span.offset) for n in firsts} if clip_tokens else {}

    def observe(name: str, rows: Tensor) -> None:
        if name in sums:
            sums[name].add(rows)
        if name in samples and ctx.batch < searched:
            samples[name].add(rows)

    with ctx.recording_calls([inspect for inspect, _ in groups], searched) as calls:
        with ctx.hook_inputs(firsts, observe, only_real_tokens=True):
            yield records
    if distributed.is_distributed():  # every rank's statistics, the same on every rank
        widths = [mods[first].in_features for (_, mods), first in zip(groups, firsts)]
        _MeanAbs.reduce([sums[n] for n in firsts] if sums else [], widths, ctx.device)
        for first, width in zip(firsts, widths) if samples else ():
            samples[first].gather(width)
    for (inspect, _), first in zip(groups, firsts):
        found = calls[inspect]
        masks = [ctx.token_mask(i) for i in range(searched)] if len(found) == searched else [None] * len(found)
        records.append(GroupRecord(
            found, masks, sums[first].mean(ctx.device) if sums else None,
            samples[first].rows() if samples else None,
        ))


def _record(
    ctx: BlockContext, groups: list[tuple[str, dict[str, nn.Module]]], span: SearchSpan, clip_tokens: int
) -> list[GroupRecord]:
    """`_recording` over one forward of the block (stopping after the searched batches for the clip search)."""
    with _recording(ctx, groups, span, clip_tokens) as records:
        if groups:
            ctx.forward_until(None, batches=span.batches if clip_tokens else None)
    return records


class _MeanAbs:
    """Running mean of |x| per channel over rows `[tokens, channels]`, accumulated in float32."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, rows: Tensor) -> None:
        part = rows.abs().sum(dim=0, dtype=torch.float32)
        self.total = part if self.total is None else self.total + part
        self.count += rows.shape[0]

    def mean(self, device: torch.device) -> Tensor | None:
        return self.total.to(device) / self.count if self.count else None

    @staticmethod
    def reduce(means: list[_MeanAbs], widths: list[int], device: torch.device) -> None:
        """Sums and counts over data-parallel ranks, in one reduction."""
        if not means:
            return
        flat = torch.cat([m.total.to(device) if m.total is not None else torch.zeros(w, device=device)
                          for m, w in zip(means, widths)])
        counts = torch.tensor([m.count for m in means], dtype=torch.int64, device=device)
        distributed.all_reduce([flat, counts])
        for m, part, count in zip(means, flat.split(widths), counts.tolist()):
            m.total, m.count = part, count


class _Sampler:
    """About `n` evenly spaced rows out of `total` rows seen batch by batch (float32, on `device`);
    `offset`: rows the ranks before this one see (the sample is then `gather`ed)."""

    def __init__(self, total: int, n: int, device: torch.device, offset: int = 0) -> None:
        self.step, self.seen, self.n, self.device = max(1, total // n), offset, n, device
        self.parts: list[Tensor] = []

    def gather(self, width: int) -> None:
        """Every rank's sampled rows, in rank order (data-parallel runs)."""
        local = torch.cat(self.parts) if self.parts else torch.zeros(0, width, device=self.device)
        self.parts = [distributed.gather_rows(local)]

    def add(self, rows: Tensor) -> None:
        self.parts.append(rows[(-self.seen) % self.step :: self.step].to(self.device, torch.float32))
        self.seen += rows.shape[0]

    def rows(self) -> Tensor | None:
        """None when no row was sampled (no token reached the group in the searched batches)."""
        rows = torch.cat(self.parts)[: self.n] if self.parts else None
        return rows if rows is not None and len(rows) else None
