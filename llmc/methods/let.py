"""OmniQuant's learnable equivalent transformation (LET), applied on the fly and folded exactly.

Shao et al., 2023, "OmniQuant: Omnidirectionally Calibrated Quantization for Large Language
Models", arXiv:2308.13137, Eq. 3-5. For a group of linears that share one input X (an adapter
`LinearGroup`), with per-channel scales s and shifts d:

    X W + B = [(X - d) / s] [s * W] + [B + d W]

`(X - d) / s` is absorbed by the op producing X (a norm's weight and bias, or v_proj's output rows:
attention averages values with weights summing to one, so a shift of V shifts its output alike),
`s * W` and `B + d W` by the group's linears (and the float readers of the same input, MoE routers).
A shift needs a bias on the producer and on every reader; the paper's code turns shifting off for
LLaMA, whose RMSNorms have none, and so do we (no bias is added to any module). LET covers the
groups fed by a norm and the group fed by the values (`BlockRoles.attn_v`: out_proj), as the
paper's code does; the MLP's second linear is left alone, as there (no shift crosses the
activation). Under grouped-query attention the scales and shifts live in v_proj's narrower space and are repeated
for the query heads sharing each value head, so they stay tied while they train.

The q/k scaling multiplies k_proj's output rows by s and divides q_proj's, which leaves q . k
unchanged, when nothing but a rotation by pairs of channels (RoPE) sits between the projections
and the product. Rather than trusting a model's layout, each block tries three tyings of s (free;
equal on RoPE's rotate-half pairs d, d + head_dim/2; equal on adjacent pairs) with random scales on
one batch and keeps the first under which the float block's output is unchanged; none (a per-head
q/k norm, Qwen3) leaves q/k unscaled. q and k are `attn_in` less `attn_v`.

Training computes the transformed parameters from the block's original ones on every step
(`LetTransform.transformed`), rounded to the model's dtype with a straight-through gradient, and
`fold` writes exactly those values into the block, so the folded block computes what was trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmc.methods.smoothquant import is_norm, smooth_scales, weight_absmax
from llmc.methods.transforms import producer_channels, tie_gqa_scales, transformed_online
from llmc.models.adapter import get_submodule_or_none
from llmc.pipeline.blockwise import BlockContext

SCALE_FLOOR = 1e-2
"""|scale| is kept at least this (the paper's code truncates its scales so)."""


def truncate(s: Tensor, floor: float = SCALE_FLOOR) -> Tensor:
    """Scales with |s| >= floor (sign kept, 0 becomes +floor); identity gradient."""
    sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
    kept = torch.where(s.abs() < floor, sign * floor, s)
    return s + (kept - s).detach()


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 `t` rounded to `dtype` (a half model's parameters), identity gradient."""
    if dtype == torch.float32:
        return t
    return t + (t.to(dtype).float() - t).detach()


@dataclass
class Smooth:
    """One group's LET: scales (and shifts) in the producer's output space."""

    producer: str
    consumers: list[str]
    scale: nn.Parameter
    shift: nn.Parameter | None
    linear_producer: bool
    heads: tuple[int, int, int] | None = None
    """(kv heads, queries per kv head, head_dim) when the consumers are wider (grouped-query attention)."""

    def expand(self, t: Tensor) -> Tensor:
        if self.heads is None:
            return t
        kv, rep, hd = self.heads
        return t.view(kv, 1, hd).expand(kv, rep, hd).reshape(-1)


@dataclass
class QKScale:
    q: str
    k: str
    scale: nn.Parameter
    q_index: Tensor
    k_index: Tensor
    tying: str


class LetTransform(nn.Module):
    """The LET of one block: its parameters, the transformed block parameters, and the fold."""

    def __init__(self, smooths: list[Smooth], qk: QKScale | None, dtypes: dict[str, torch.dtype]) -> None:
        super().__init__()
        self.smooths, self.qk, self.dtypes = smooths, qk, dtypes
        self.params = nn.ParameterList(
            [p for s in smooths for p in (s.scale, s.shift) if p is not None] + ([qk.scale] if qk else [])
        )

    def transformed(self, base: dict[str, Tensor]) -> dict[str, Tensor]:
        """The transformed block parameters (float32, rounded to each parameter's dtype) from the
        original ones in `base` (float32, by name relative to the block)."""
        out: dict[str, Tensor] = {}

        def cur(name: str) -> Tensor | None:
            return out[name] if name in out else base.get(name)

        for sm in self.smooths:  # input side first: W s, B + W d
            s = sm.expand(truncate(sm.scale))
            d = sm.expand(sm.shift) if sm.shift is not None else None
            for c in sm.consumers:
                w = cur(f"{c}.weight")
                if d is not None:
                    out[f"{c}.bias"] = cur(f"{c}.bias") + w @ d
                out[f"{c}.weight"] = w * s
        for sm in self.smooths:  # output side: the producer's output becomes (x - d) / s
            s, p = truncate(sm.scale), sm.producer
            out[f"{p}.weight"] = cur(f"{p}.weight") / (s[:, None] if sm.linear_producer else s)
            bias = cur(f"{p}.bias")
            if bias is not None:
                out[f"{p}.bias"] = (bias - sm.shift if sm.shift is not None else bias) / s
        if self.qk is not None:
            s = truncate(self.qk.scale)
            for name, factor in ((self.qk.q, 1 / s[self.qk.q_index]), (self.qk.k, s[self.qk.k_index])):
                out[f"{name}.weight"] = cur(f"{name}.weight") * factor[:, None]
                bias = cur(f"{name}.bias")
                if bias is not None:
                    out[f"{name}.bias"] = bias * factor
        return {n: as_dtype(t, self.dtypes[n]) for n, t in out.items()}

    @torch.no_grad()
    def fold(self, block: nn.Module, base: dict[str, Tensor]) -> None:
        """Write the transformed parameters into the block (exactly the values training used)."""
        params = dict(block.named_parameters())
        for name, value in self.transformed(base).items():
            params[name].copy_(value.to(params[name].dtype))


# ---- planning the LET of a block ------------------------------------------------------------


def _head_dim(ctx: BlockContext) -> int | None:
    try:
        return ctx.adapter.block_head_dim(ctx.block)
    except (AttributeError, TypeError, ValueError):
        return None


def let_groups(ctx: BlockContext) -> list[tuple[str, list[str], list[str], nn.Module]]:
    """(producer, linears, readers, producer module) of each group LET can transform."""
    roles = ctx.adapter.block_roles
    values = roles.attn_v if roles is not None else None
    out, claimed = [], set()
    for group, mods in ctx.groups():
        if group.prev_op is None or len(mods) != len(group.linears) or group.prev_op in claimed:
            continue
        if transformed_online(mods.values()):
            continue
        prev = ctx.block.get_submodule(group.prev_op)
        if not (is_norm(prev) or (isinstance(prev, nn.Linear) and group.prev_op == values)):
            continue
        channels = next(iter(mods.values())).in_features
        width = producer_channels(prev)
        head_dim = _head_dim(ctx)
        if width != channels and not (head_dim and channels % width == 0 and width % head_dim == 0):
            continue
        claimed.add(group.prev_op)
        out.append((group.prev_op, list(group.linears), list(group.also_reads), prev))
    return out


def init_smooth(
    ctx: BlockContext, producer: str, linears: list[str], readers: list[str], prev: nn.Module,
    stats: tuple[Tensor, Tensor], alpha: float, use_shift: bool,
) -> Smooth:
    """SmoothQuant's scales (alpha, activation and weight absmax) and, where the producer and the
    readers have biases, Outlier Suppression+'s shifts (the middle of each channel's range; the
    scales then see the shifted range)."""
    xmin, xmax = (t.float() for t in stats)
    modules = [ctx.block.get_submodule(n) for n in linears]
    width, channels = producer_channels(prev), xmin.numel()
    heads = None
    if width != channels:
        hd = _head_dim(ctx)
        heads = (width // hd, channels // width, hd)
    consumers = linears + readers
    shiftable = use_shift and getattr(prev, "bias", None) is not None and all(
        ctx.block.get_submodule(n).bias is not None for n in consumers
    )
    shift = None
    if shiftable:
        shift = tie_gqa_scales((xmin + xmax) / 2, width, heads[2]) if heads else (xmin + xmax) / 2
        absmax = torch.maximum(xmax - shift, shift - xmin)
    else:
        absmax = torch.maximum(xmax.abs(), xmin.abs())
    scale = smooth_scales(absmax, weight_absmax(modules).to(absmax.device), alpha)
    if heads:
        scale = tie_gqa_scales(scale, width, heads[2])
        scale, shift = (None if t is None else t.view(heads)[:, 0, :].reshape(-1) for t in (scale, shift))
    device = prev.weight.device
    return Smooth(
        producer, consumers, nn.Parameter(scale.to(device)),
        nn.Parameter(shift.to(device)) if shift is not None else None,
        isinstance(prev, nn.Linear), heads,
    )


def qk_candidates(ctx: BlockContext) -> list[QKScale]:
    """The q/k scalings to try on this block (see the module docstring), free tying first."""
    roles = ctx.adapter.block_roles
    if roles is None or roles.attn_v is None:
        return []
    pair = [n for n in roles.attn_in if n != roles.attn_v]
    mods = [get_submodule_or_none(ctx.block, n) for n in pair]
    head_dim = _head_dim(ctx)
    if len(pair) != 2 or head_dim is None or not all(hasattr(m, "out_features") for m in mods):
        return []
    (q, qm), (k, km) = sorted(zip(pair, mods), key=lambda t: -t[1].out_features)  # k: the narrower
    if qm.out_features % km.out_features or km.out_features % head_dim:
        return []
    rep = qm.out_features // km.out_features
    device = km.weight.device
    k_dims = torch.arange(km.out_features, device=device)
    head, dim = k_dims // head_dim, k_dims % head_dim
    half = head_dim // 2
    tyings = {"free": k_dims}
    if head_dim % 2 == 0:
        tyings["rotate_half"] = head * half + dim % half
        tyings["adjacent"] = head * half + dim // 2
    out = []
    for tying, k_index in tyings.items():
        size = int(k_index.max()) + 1
        q_dims = torch.arange(qm.out_features, device=device)
        q_index = k_index[(q_dims // head_dim // rep) * head_dim + q_dims % head_dim]
        out.append(QKScale(q, k, nn.Parameter(torch.ones(size, device=device)), q_index, k_index, tying))
    return out
