"""AWQ: activation-aware weight quantization (Lin et al., 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", arXiv:2306.00978), as in ModelTC/llmc.

Per block, for each group of linears that share one input (the adapter's `LinearGroup`s):

1. Scale search (`trans`). With x = mean |input| per channel over the calibration tokens,
   candidate per-input-channel scales are, for alpha = i / n_grid (i < n_grid),
   `trans_version: v2` (llmc's default, the paper's formula): s = x^alpha;
   `trans_version: v1` (llmc's v1, AutoAWQ's "duo scaling"): s = x^alpha / w^(1 - alpha),
   w = mean over output rows of |W| normalized by the max |W| of its quantization group.
   s is clamped at 1e-4 and divided by sqrt(max(s) min(s)). Each candidate sets the
   group's weights to Q(W s) / s, re-runs the group's inspect module on its recorded calls
   and scores the squared error against the float output (float32, batch by batch).
   The best s is folded into the producer (`fold_scales`); a linear producer with fewer
   outputs (v_proj under grouped-query attention) gets tied scales (`tie_gqa_scales`),
   searched already tied. A group is left unscaled when it has no producer, when one of its
   linears is not a quantization target, or when the producer cannot absorb the scale.
2. Weight clipping (`weight_clip`, `clip_version: v1`). Per target linear and per
   quantization group of each output row, the weight range is shrunk by 1 - i/20,
   i < 10, keeping the ratio that minimizes the error of the group's partial dot products
   on 512 evenly spaced tokens of the search batches (as AutoAWQ); the weight is then clamped to
   [min, max] (or [-max, max] with `clip_sym`). Acceptance rule, in place of AutoAWQ's
   skipping of q/k by name: a linear's clip is kept only if it lowers the error of the
   group's inspect module output with the group quantized, the same criterion as step 1.
   So a clip whose error the attention softmax amplifies (the reason for that skip) is
   dropped on the data. Clipping runs after all scales are folded, on re-recorded inputs;
   per_tensor weights are not clipped.
   Each step records what all its groups need in one forward of the block (the scale step over
   every batch, for the channel means; the clip step over the search batches only): folding a
   scale does not change the float block's function, and clips are chosen, as in AutoAWQ, on
   inputs recorded before any group of the block is clipped.
3. If this is the last method of the composition, every target linear is wrapped.

Config keys: `quant.weight.*` (the quantizer Q), `quant.special.{trans (true), trans_version
(v2), n_grid (20), weight_clip (true), clip_version (v1), clip_sym (quant.weight.symmetric),
search_tokens (65536, AutoAWQ's budget: the searches' error is measured on the leading calibration
batches holding up to this many tokens; null = all)}`.
The search is weight-only: activation quantization is not simulated in the objective.

Data-parallel calibration (`llmc.pipeline.distributed`): channel means are reduced as sums and
counts; the searched batches are the leading ones of the whole calibration set (a rank may hold
all, some or none); each candidate's squared error is summed over ranks before comparing; the clip
sample is gathered in rank order, each rank sampling at its global token offset: the one-process
rows whenever every real token reaches the group (dense groups; MoE experts with
`calib.moe_all_experts`), rows as evenly spaced but not the same for a routed-only expert.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.methods.awq_search import GroupRecord, _record, _recording, search_span
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.transforms import fold_scales, producer_channels, tie_gqa_scales, transformed_online
from llmc.models.adapter import LinearGroup, ModelAdapter
from llmc.pipeline import distributed
from llmc.pipeline.blockwise import BlockContext, ModuleCall, real_tokens


class AWQSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trans: bool = Field(True, description="Search and fold per-channel scales.")
    trans_version: Literal["v1", "v2"] = Field(
        "v2", description="v2: s = x^a (paper); v1: s = x^a / w^(1-a) (AutoAWQ duo scaling)."
    )
    n_grid: int = Field(20, ge=1, description="Grid points of alpha in [0, 1).")
    weight_clip: bool = Field(True, description="Search per-group weight clipping ranges.")
    clip_version: Literal["v1"] = Field("v1", description="v1: clamp the float weight to the found range.")
    clip_sym: bool | None = Field(None, description="Symmetric clip range; default quant.weight.symmetric.")
    search_tokens: int | None = Field(
        65536, ge=1, description="Score the scale and clip searches on the first calibration batches holding at most "
        "this many tokens (channel statistics still use all); null = all. 65536 is AutoAWQ's budget."
    )


@register_method
class AWQ(QuantMethod):
    name = "AWQ"
    Special = AWQSpecial
    module_schemes = True
    data_parallel = True  # statistics, errors and clip samples are reduced over ranks (see the docstring)
    clip_grid = 20
    clip_max_shrink = 0.5
    clip_tokens = 512
    _observed: tuple[nn.Module, list[GroupRecord]] | None = None
    """The scale search's records of the block the last `observe` watched."""

    def extra_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        """The recorded calls of every group's inspect module (inputs and outputs of each search
        token, all groups at once) plus float32 copies of the largest group's weights."""
        elem = next(model.parameters()).element_size()
        hidden = model.get_input_embeddings().embedding_dim
        tokens = min(calib_tokens, self.special.search_tokens or calib_tokens)
        record = weights = 0
        for block in adapter.get_blocks(model)[:1]:
            for group in adapter.block_groups(block):
                linears = [block.get_submodule(n) for n in group.linears]
                record += tokens * elem * (linears[0].in_features + hidden)
                weights = max(weights, 3 * 4 * sum(m.weight.numel() for m in linears))
        return record + weights

    def _scaled_groups(self, ctx: BlockContext) -> list[tuple[LinearGroup, dict[str, nn.Module], nn.Module]]:
        return [(g, mods, prev) for g, mods in ctx.groups() if (prev := self._producer(ctx, g, mods)) is not None]

    @contextlib.contextmanager
    def observe(self, ctx: BlockContext) -> Iterator[None]:
        """Record the scale search's inputs during the pipeline's float forward of the block."""
        if not self.special.trans or ctx.inputs is None:
            yield
            return
        groups = [(g.inspect, mods) for g, mods, _ in self._scaled_groups(ctx)]
        with _recording(ctx, groups, search_span(ctx, self.special.search_tokens), 0) as records:
            yield
        self._observed = (ctx.block, records)

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> None:
        sp = self.special
        searched = search_span(ctx, sp.search_tokens)
        observed, self._observed = self._observed, None
        if sp.trans:
            scaled = self._scaled_groups(ctx)
            # Folding a scale leaves the float block's function unchanged, so one forward (the
            # pipeline's, when it runs the float block) records what every group's search needs.
            records = (observed[1] if observed and observed[0] is ctx.block
                       else _record(ctx, [(g.inspect, mods) for g, mods, _ in scaled], searched, clip_tokens=0))
            del observed
            for (group, mods, prev), record in zip(scaled, records, strict=True):
                if record.x_mean is not None:  # None: no token reached the group (an MoE expert never routed to)
                    self._scale_group(ctx, group, mods, prev, record)
            del records
        if sp.weight_clip:
            clipped = [(g, {n: m for n, m in mods.items() if isinstance(m, nn.Linear)
                            and self.quantizers_for(ctx, n)[0].granularity != "per_tensor"}) for g, mods in ctx.groups()]
            clipped = [(g, mods) for g, mods in clipped if mods]
            # Inputs re-recorded once, after every scale is folded.
            records = _record(ctx, [(g.inspect, mods) for g, mods in clipped], searched, self.clip_tokens)
            for (group, mods), record in zip(clipped, records):
                if record.sample is not None:  # None: no token reached the group
                    self._clip_group(ctx, group.inspect, mods, record)
            del records
        for name in ctx.targets:
            self.wrap_linear(ctx, name)

    # ---- scale search ------------------------------------------------------------------

    def _producer(
        self, ctx: BlockContext, group: LinearGroup, mods: dict[str, nn.Module]
    ) -> nn.Module | None:
        """The op the group's scale folds into, or None when the group is left unscaled."""
        if group.prev_op is None or len(mods) != len(group.linears):
            return None
        if not all(isinstance(m, nn.Linear) for m in mods.values()) or transformed_online(mods.values()):
            return None
        prev = ctx.block.get_submodule(group.prev_op)
        channels = next(iter(mods.values())).in_features
        try:
            out = producer_channels(prev)
        except TypeError:
            return None
        if out == channels:
            return prev
        head_dim = _head_dim(ctx)
        if isinstance(prev, nn.Linear) and head_dim and channels % out == 0 and out % head_dim == 0:
            return prev
        return None

    def _scale_group(
        self, ctx: BlockContext, group: LinearGroup, mods: dict[str, nn.Module], prev: nn.Module, record: GroupRecord
    ) -> None:
        inspect = group.inspect
        calls, masks, x_mean = record.calls, record.masks, record.x_mean
        module = ctx.block.get_submodule(inspect)
        linears = list(mods.values())
        quantizers = [self.quantizers_for(ctx, n)[0] for n in mods]
        originals = [m.weight.detach().clone() for m in linears]
        floats = [w.to(ctx.device, torch.float32) for w in originals]
        w_mean = self._weight_mean(originals, quantizers, ctx.device) if self.special.trans_version == "v1" else None
        producer_out = producer_channels(prev)
        head_dim = _head_dim(ctx)

        def candidate(alpha: float) -> Tensor:
            s = x_mean.pow(alpha)
            if w_mean is not None:
                s = s / (w_mean.pow(1 - alpha) + 1e-4)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            if s.numel() != producer_out:
                s = tie_gqa_scales(s, producer_out, head_dim)
            return s

        errors = []
        for i in range(self.special.n_grid):
            s = candidate(i / self.special.n_grid)
            for m, wf, q in zip(linears, floats, quantizers):
                m.weight.copy_(q.fake_quant(wf * s).div_(s))
            errors.append(_output_error(module, calls, masks))
        del floats
        for m, w in zip(linears, originals):
            m.weight.copy_(w)
        best = _first_min(distributed.sum_floats(errors))  # data-parallel: summed over ranks
        if best is not None:
            fold_scales(prev, linears + ctx.readers(group), candidate(best / self.special.n_grid), head_dim)

    def _weight_mean(self, weights: list[Tensor], quantizers: list, device: torch.device) -> Tensor:
        """Mean over output rows of |W| normalized by its quantization group's max |W| (each linear's own groups)."""
        total, n_rows = 0, 0
        for t, q in zip(weights, quantizers):
            w = t.to(device, torch.float32)
            rows = q.rows(w).abs()
            rows = rows / (rows.amax(dim=1, keepdim=True) + 1e-6)
            total = total + q.unrows(rows, w.shape).sum(dim=0)
            n_rows += w.shape[0]
        return total / n_rows

    # ---- weight clipping ---------------------------------------------------------------

    def _clip_group(self, ctx: BlockContext, inspect: str, mods: dict[str, nn.Module], record: GroupRecord) -> None:
        calls, masks, sample = record.calls, record.masks, record.sample
        module = ctx.block.get_submodule(inspect)
        floats = {n: m.weight.detach().to(ctx.device, torch.float32).clone() for n, m in mods.items()}
        dtype = next(iter(mods.values())).weight.dtype
        quantizers = {n: self.quantizers_for(ctx, n)[0] for n in mods}
        for n, m in mods.items():
            m.weight.copy_(quantizers[n].fake_quant(floats[n]).to(dtype))
        best = distributed.sum_floats([_output_error(module, calls, masks)])[0]  # data-parallel: over all ranks
        for n, m in mods.items():
            fq = quantizers[n].fake_quant
            clipped = self._clip_weight(floats[n], sample, quantizers[n])
            m.weight.copy_(fq(clipped).to(dtype))
            err = distributed.sum_floats([_output_error(module, calls, masks)])[0]
            if err < best:
                best, floats[n] = err, clipped
            else:
                m.weight.copy_(fq(floats[n]).to(dtype))
        for n, m in mods.items():
            m.weight.copy_(floats[n].to(dtype))

    def _clip_weight(self, w: Tensor, x: Tensor, q) -> Tensor:
        """Clamp each quantization group of `w` [out, in] to the range with the least output error on `x`
        (groups of `q`, the linear's weight quantizer)."""
        out_features, in_features = w.shape
        rows = q.rows(w)  # [out * groups, group] (per_group) or [out, in] (per_channel)
        size = rows.shape[1]
        groups = rows.shape[0] // out_features
        rows = rows.view(out_features, groups, size)
        x = F.pad(x, (0, groups * size - in_features)).view(-1, groups, size).transpose(0, 1)  # [g, n, size]
        sym = q.symmetric if self.special.clip_sym is None else self.special.clip_sym
        chunk = max(1, 2**24 // (groups * x.shape[1]))
        clipped = []
        for start in range(0, out_features, chunk):
            wc = rows[start : start + chunk]  # [o, g, size]
            hi0 = wc.abs().amax(dim=-1, keepdim=True) if sym else wc.amax(dim=-1, keepdim=True)
            lo0 = -hi0 if sym else wc.amin(dim=-1, keepdim=True)
            ref = torch.bmm(x, wc.permute(1, 2, 0))  # [g, n, o]
            best_err = torch.full(hi0.shape, math.inf, device=w.device)
            best_lo, best_hi = lo0.clone(), hi0.clone()
            for i in range(int(self.clip_max_shrink * self.clip_grid)):
                ratio = 1 - i / self.clip_grid
                lo, hi = lo0 * ratio, hi0 * ratio
                qw = q.fake_quant(torch.clamp(wc, lo, hi).reshape(-1, size)).view_as(wc)
                err = (
                    (torch.bmm(x, qw.permute(1, 2, 0)) - ref).pow(2).mean(dim=1).T.unsqueeze(-1)
                )  # [o, g, 1]
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
            clipped.append(torch.clamp(wc, best_lo, best_hi))
        return q.unrows(torch.cat(clipped).reshape(-1, size), w.shape)


# ---- helpers ---------------------------------------------------------------------------


def _head_dim(ctx: BlockContext) -> int | None:
    try:
        return ctx.adapter.block_head_dim(ctx.block)
    except (AttributeError, TypeError, ValueError):
        return None


def _output_error(module: nn.Module, calls: list[ModuleCall], masks: list[Tensor | None]) -> float:
    """Summed squared error (float32) of re-running `module` against its recorded outputs."""
    total = None
    for call, mask in zip(calls, masks):
        diff = real_tokens(call.rerun(module).float().sub_(call.output), mask)
        err = diff.pow_(2).sum()
        total = err if total is None else total + err
    return float(total) if total is not None else 0.0


def _first_min(errors: list[float]) -> int | None:
    """The index of the first smallest error (None: none is below infinity, e.g. all NaN)."""
    best, index = math.inf, None
    for i, err in enumerate(errors):
        if err < best:
            best, index = err, i
    return index
