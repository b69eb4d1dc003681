"""OS+ (Outlier Suppression+): channel-wise shifting and scaling of activations, then quantization.

Wei et al., 2023, "Outlier Suppression+: Accurate quantization of large language models by
equivalent and effective shifting and scaling" (EMNLP 2023, arXiv:2304.09145); ModelTC/llmc's
`OsPlus`. Activation outliers are asymmetric (a channel sits far from zero on one side) and
concentrated in a few channels. Per group of linears that share one input X (the adapter's
`LinearGroup`s), per channel j, over the calibration tokens (paper, Sec. 4.1-4.2):

    shift  z_j = (max_j X + min_j X) / 2          (X - z is symmetric around 0 per channel)
    scale  s_j = max(1, max_j |X - z| / t)        (only channels whose range exceeds t shrink)

The threshold t is searched over `n_grid` candidates spaced geometrically from the largest
channel maximum of |X - z| (no channel scaled) down to the smallest (every channel brought to one
range). The paper's fast search tries only the channel maxima themselves; those leave the gap
between the outlier channels and the bulk unsearched, where the best t lay on the test models
(llmc uses a uniform grid). Each candidate is scored by the squared error of the group's inspect
module output (attention, MLP, or the linear itself) against its float output, with the group's
weights fake-quantized as Q(W s) and its input as Q((X - z) / s) with the configured weight and
activation quantizers, on the calibration tokens (padding excluded); ties keep the larger t.
The search is coarse to fine: every k-th candidate (k = sqrt(n_grid) / 2, rounded; 5 of 100),
then every candidate within k of the two best coarse ones, about a third of the grid in all
(on the tests' outlier models it found the full grid's best in every group; the error is not
unimodal in t, so one coarse best alone sometimes missed it). The errors stay on the device until
each pass ends (no host sync per batch), and the linears reading one input (q, k, v) share its
quantized input.

Folding keeps the float model unchanged: the producer's output becomes (X - z) / s (a norm's
weight and bias, a linear producer's rows and bias) and each linear reading X gets W' = W diag(s),
b' = b + W z (routers reading X too: `LinearGroup.also_reads`). The shift needs a bias on both
sides: it is applied only where the producer and every linear reading X already have one (OPT's
LayerNorms and biased q/k/v/fc1). RMSNorm has no bias, and a bias added to it, or to a bias-free
linear, would not load back into the model's transformers class, so Llama-like models get the
scaling only (as in llmc, which shifts only models with biases). Groups fed by a norm are
transformed by default; groups fed by a linear (v->o, up->down, fc1->fc2) with
`smooth_linear_producers` (scales tied across query heads that share a value head under
grouped-query attention); among those only v->o is shifted, since attention outputs are convex
combinations of the values and so carry a shift of v through exactly (an activation between up
and down, or fc1 and fc2, does not). A group is transformed only when all its linears are
quantization targets and plain linears (an online input transform, e.g. a rotation, blocks a fold).
Then every target is wrapped with the configured quantizers when this method is final.

Config keys: `quant.weight.*`, `quant.act.*`, and under `quant.special` (use_shift and weight_clip are llmc's):
  use_shift (bool, default true): shift where it folds exactly (see above); false: scaling only.
  weight_clip (bool, default false): llmc's clipping after the transform is not done here; true is
    an error pointing to `method: [OsPlus, AWQ]` with `AWQ: {trans: false}` (AWQ's clip search).
  smooth_linear_producers (bool, default false): also transform groups fed by a linear.
  n_grid (int, default 100): the thresholds of the grid per group.
  coarse_to_fine (bool, default true): search the grid coarse to fine (above); false: try all.
  search_tokens (int or null, default null: all): score the candidates on the first calibration
    batches holding at most this many tokens (as AWQ's key; the channel ranges still use all);
    65536 is AWQ's default.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from llmc.methods.awq_search import search_batches
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.smoothquant import is_norm
from llmc.methods.transforms import fold_scales, producer_channels, tie_gqa_scales, transformed_online
from llmc.models.adapter import LinearGroup, ModelAdapter
from llmc.pipeline.blockwise import BlockContext, ModuleCall, real_tokens


class OsPlusSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    use_shift: bool = Field(True, description="Shift channels to symmetric ranges where it folds exactly.")
    weight_clip: bool = Field(False, description="Not done by OsPlus; clip with method: [OsPlus, AWQ].")
    smooth_linear_producers: bool = Field(False, description="Also transform groups fed by a linear (v->o, up->down).")
    n_grid: int = Field(100, ge=1, description="The thresholds of the grid per group.")
    coarse_to_fine: bool = Field(True, description="Search the grid coarse to fine instead of trying all.")
    search_tokens: int | None = Field(
        None, ge=1, description="Score the candidates on the first calibration batches holding at most this many "
        "tokens (channel ranges still use all); null = all."
    )

    @field_validator("weight_clip")
    @classmethod
    def _no_clip(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "OsPlus does not clip weights itself; use method: [OsPlus, AWQ] with special "
                "{AWQ: {trans: false}} (AWQ's clip search), or quant.weight.calib_algo: mse"
            )
        return value


@dataclass
class GroupPlan:
    """One group to transform: its linears, the producer of their input, and how to fold into it."""

    group: LinearGroup
    linears: list[nn.Linear]
    prev: nn.Module
    shift: bool
    head_dim: int | None
    """Set when the producer is narrower than the input (v_proj under grouped-query attention)."""


@dataclass
class GroupRecord:
    """What one group's search uses, from one forward of the float block."""

    calls: list[ModuleCall] = field(default_factory=list)
    masks: list[Tensor | None] = field(default_factory=list)
    xmin: Tensor | None = None
    xmax: Tensor | None = None
    """Per input channel min and max over the real calibration tokens (float32; None: no token)."""

    def add(self, rows: Tensor) -> None:
        if rows.numel() == 0:
            return
        lo, hi = rows.amin(dim=0).float(), rows.amax(dim=0).float()
        self.xmin = lo if self.xmin is None else torch.minimum(self.xmin, lo)
        self.xmax = hi if self.xmax is None else torch.maximum(self.xmax, hi)


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), Tensor)


def candidate_thresholds(channel_max: Tensor, n_grid: int) -> Tensor:
    """`n_grid` thresholds t, descending and geometrically spaced from the largest channel maximum
    (no channel scaled) down to the smallest positive one (every channel scaled to the same range)."""
    positive = channel_max[channel_max > 0]
    if positive.numel() == 0:
        return positive
    hi, lo = positive.max(), positive.min()
    if n_grid == 1 or hi <= lo:
        return hi.reshape(1)
    steps = torch.linspace(0, 1, n_grid, device=channel_max.device)
    return hi * (lo / hi) ** steps


def to_producer(vector: Tensor, producer_out: int, head_dim: int | None) -> Tensor:
    """The producer's share of a per-input-channel vector tied across query heads (GQA)."""
    if vector.numel() == producer_out:
        return vector
    kv_heads, rep = producer_out // head_dim, vector.numel() // producer_out
    return vector.view(kv_heads, rep, head_dim)[:, 0, :].reshape(producer_out)


@contextlib.contextmanager
def transformed_inputs(linears: list[nn.Module], fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside this context each of `linears` reads `fn(input)` instead of its input; linears called
    in a row on the same input tensor (q, k, v) share one `fn(input)`."""
    last: list = [None, None]

    def hook(_m: nn.Module, args: tuple) -> tuple:
        if args[0] is not last[0]:
            last[:] = [args[0], fn(args[0])]
        return (last[1], *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        yield
    finally:
        last.clear()
        for h in handles:
            h.remove()


def output_error(module: nn.Module, calls: list[ModuleCall], masks: list[Tensor | None]) -> Tensor:
    """Summed squared error of re-running `module` against its recorded outputs, real tokens only: per
    call in float32, summed in float64, on the device (no host sync)."""
    total = torch.zeros((), dtype=torch.float64, device=calls[0].output.device if calls else None)
    for call, mask in zip(calls, masks):
        diff = real_tokens(call.rerun(module).float() - call.output.float(), mask)
        total += diff.pow(2).sum().double()
    return total


def coarse_step(n: int) -> int:
    """The stride of the coarse pass over `n` candidates (1: try all)."""
    return max(1, round(math.sqrt(n) / 2))


def refined(n: int, step: int, centers: list[int]) -> list[int]:
    """The candidates within `step` of the `centers` (the fine pass)."""
    return sorted({i for c in centers for i in range(max(0, c - step + 1), min(n, c + step))})


@register_method
class OsPlus(QuantMethod):
    name = "OsPlus"
    aliases = ("OS+",)
    needs_calibration = True
    Special = OsPlusSpecial
    float_quant = True
    _observed: tuple[nn.Module, list[GroupRecord]] | None = None

    def plans(self, ctx: BlockContext) -> list[GroupPlan]:
        """The groups to transform in this block, in execution order."""
        roles = ctx.adapter.block_roles
        attn_v = roles.attn_v if roles is not None else None
        out = []
        for group, mods in ctx.groups():
            if group.prev_op is None or len(mods) != len(group.linears):
                continue
            linears = [mods[n] for n in group.linears]
            if not all(isinstance(m, nn.Linear) for m in linears) or transformed_online(linears):
                continue
            prev = ctx.block.get_submodule(group.prev_op)
            from_linear = isinstance(prev, nn.Linear)
            if not (is_norm(prev) or (from_linear and self.special.smooth_linear_producers)):
                continue
            head_dim = None
            channels, produced = linears[0].in_features, producer_channels(prev)
            if produced != channels:
                head_dim = _head_dim(ctx)
                if not (from_linear and head_dim and channels % produced == 0 and produced % head_dim == 0):
                    continue
            readers = ctx.readers(group)
            shift = (self.special.use_shift and (not from_linear or group.prev_op == attn_v)
                     and has_bias(prev) and all(has_bias(m) for m in linears + readers))
            out.append(GroupPlan(group, linears, prev, shift, head_dim))
        return out

    def extra_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        """The recorded inspect-module calls of every group (inputs and outputs of every searched
        token) plus float32 copies of the largest group's weights."""
        calib_tokens = min(calib_tokens, self.special.search_tokens or calib_tokens)
        elem = next(model.parameters()).element_size()
        hidden = model.get_input_embeddings().embedding_dim
        record = weights = 0
        for block in adapter.get_blocks(model)[:1]:
            for group in adapter.block_groups(block):
                linears = [block.get_submodule(n) for n in group.linears]
                record += calib_tokens * elem * (linears[0].in_features + hidden)
                weights = max(weights, 2 * 4 * sum(m.weight.numel() for m in linears))
        return record + weights

    @contextlib.contextmanager
    def recording(self, ctx: BlockContext, plans: list[GroupPlan]) -> Iterator[list[GroupRecord]]:
        """Record each group's inspect-module calls and input channel ranges in the forwards run here."""
        records = [GroupRecord() for _ in plans]
        by_input = {p.group.linears[0]: r for p, r in zip(plans, records)}
        batches = search_batches(ctx, self.special.search_tokens)
        with ctx.recording_calls([p.group.inspect for p in plans], batches=batches) as calls:
            with ctx.hook_inputs(list(by_input), lambda name, rows: by_input[name].add(rows), only_real_tokens=True):
                yield records
        for plan, record in zip(plans, records):
            record.calls = calls[plan.group.inspect]
            count = len(record.calls)
            record.masks = [ctx.token_mask(i) for i in range(batches)] if count == batches else [None] * count

    @contextlib.contextmanager
    def observe(self, ctx: BlockContext) -> Iterator[None]:
        """Record the search's inputs during the pipeline's forward of the float block."""
        plans = self.plans(ctx) if ctx.inputs is not None else []
        if not plans:
            yield
            return
        with self.recording(ctx, plans) as records:
            yield
        self._observed = (ctx.block, records)

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> None:
        observed, self._observed = self._observed, None
        plans = self.plans(ctx) if ctx.inputs is not None else []
        if plans:
            if observed is not None and observed[0] is ctx.block and len(observed[1]) == len(plans):
                records = observed[1]
            else:  # folding leaves the float block unchanged: one forward serves every group
                with self.recording(ctx, plans) as records:
                    ctx.forward_until(None)
            del observed
            for plan, record in zip(plans, records):
                if record.xmax is not None:  # None: no token reached the group (an MoE expert)
                    shift, scales = self.search(ctx, plan, record)
                    self.fold(ctx, plan, shift, scales)
            del records
        for name in ctx.targets:
            self.wrap_linear(ctx, name)

    @torch.no_grad()
    def search(self, ctx: BlockContext, plan: GroupPlan, record: GroupRecord) -> tuple[Tensor | None, Tensor]:
        """The shift (None: not shifted) and the scales of the best threshold for one group."""
        xmin, xmax = record.xmin.to(ctx.device), record.xmax.to(ctx.device)
        produced = producer_channels(plan.prev)
        shift = None
        if plan.shift:
            shift = (xmax + xmin) / 2
            if plan.head_dim is not None:
                shift = tie_gqa_scales(shift, produced, plan.head_dim)
            channel_max = torch.maximum(xmax - shift, shift - xmin)
        else:
            channel_max = torch.maximum(xmax, -xmin)
        zero = torch.zeros_like(channel_max) if shift is None else shift
        module = ctx.block.get_submodule(plan.group.inspect)
        linears = plan.linears
        dtype = linears[0].weight.dtype
        floats = [m.weight.detach().to(ctx.device, torch.float32).clone() for m in linears]
        originals = [(m.weight.detach().clone(), m.bias.detach().clone() if has_bias(m) else None) for m in linears]
        wq = self.weight_quantizer.for_dtype(dtype)
        aq = self.act_quantizer
        current = {"s": torch.ones_like(channel_max)}

        def quantized_input(x: Tensor) -> Tensor:
            moved = ((x.float() - zero) / current["s"]).to(x.dtype)
            return aq.fake_quant(moved) if aq is not None else moved

        thresholds = candidate_thresholds(channel_max, self.special.n_grid)
        n = len(thresholds)
        if n == 0:
            return shift, torch.ones_like(channel_max)

        def scales_at(i: int) -> Tensor:
            scales = (channel_max / thresholds[i]).clamp(min=1.0)
            return tie_gqa_scales(scales, produced, plan.head_dim) if plan.head_dim is not None else scales

        errors = torch.full((n,), math.inf, dtype=torch.float64, device=ctx.device)  # inf: not tried
        tried: set[int] = set()

        def evaluate(indices: list[int]) -> None:
            for i in indices:
                if i in tried:
                    continue
                tried.add(i)
                current["s"] = scales = scales_at(i)
                for m, w in zip(linears, floats):
                    m.weight.copy_(wq.fake_quant(w * scales).to(dtype))
                errors[i] = output_error(module, record.calls, record.masks)

        step = coarse_step(n) if self.special.coarse_to_fine else 1
        try:
            if shift is not None:  # the same for every candidate
                for m, w, (_, b) in zip(linears, floats, originals):
                    m.bias.copy_((b.float() + w @ shift).to(b.dtype))
            with transformed_inputs(linears, quantized_input):
                evaluate(list(range(0, n, step)) + [n - 1])
                if step > 1:
                    evaluate(refined(n, step, _ranked(errors)[:2]))
        finally:
            for m, (w, b) in zip(linears, originals):
                m.weight.copy_(w)
                if b is not None:
                    m.bias.copy_(b)
        best = _ranked(errors)[0]
        return shift, scales_at(best) if math.isfinite(errors[best]) else torch.ones_like(channel_max)

    @torch.no_grad()
    def fold(self, ctx: BlockContext, plan: GroupPlan, shift: Tensor | None, scales: Tensor) -> None:
        """Producer output X -> (X - shift) / scales; readers W -> W diag(scales), b -> b + W shift."""
        readers = plan.linears + ctx.readers(plan.group)
        if shift is not None:
            for m in readers:
                m.bias.copy_((m.bias.float() + m.weight.float() @ shift.to(m.weight.device)).to(m.bias.dtype))
            bias = plan.prev.bias
            produced = to_producer(shift, producer_channels(plan.prev), plan.head_dim).to(bias.device)
            bias.copy_((bias.float() - produced).to(bias.dtype))
        fold_scales(plan.prev, readers, scales, plan.head_dim)


def _ranked(errors: Tensor) -> list[int]:
    """Candidate indices by error, ties (and NaN last) in grid order: the larger t first."""
    values = errors.tolist()
    return sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), 0.0 if math.isnan(values[i]) else values[i], i))


def _head_dim(ctx: BlockContext) -> int | None:
    try:
        return ctx.adapter.block_head_dim(ctx.block)
    except (AttributeError, TypeError, ValueError):
        return None
