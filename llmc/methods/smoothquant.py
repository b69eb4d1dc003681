"""SmoothQuant: migrate activation outliers into the weights, then quantize W8A8.

Xiao et al., 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models" (arXiv:2211.10438). A few input channels of a linear carry most
of the activation range, which per-token or per-tensor activation quantization cannot
represent; the weights are easy to quantize. Per input channel j of a group of linears
that share one input X, with migration strength alpha (paper, Eq. 4):

    s_j = max|X_j| ** alpha / max_over_linears(max_i |W_ij|) ** (1 - alpha)

The input is divided by s (folded into the op that produces it: the preceding
LayerNorm/RMSNorm's weight and bias) and the weight columns multiplied by s, so the
float model is unchanged (`llmc.methods.transforms.fold_scales`). As in the paper and
llmc, only groups fed by a norm (q/k/v and the first MLP linears) are smoothed by
default; linears fed by a linear (v->o, up->down) only on request. Statistics come from
one forward of the block over the calibration set, padding tokens excluded. A group is
smoothed only when all its linears are quantization targets. Then every target is
wrapped with the configured weight and activation quantizers (when this method is the
last of a composition); static activation ranges are calibrated by the pipeline after.
Data-parallel calibration (`llmc.pipeline.distributed`): the per-channel max |X| is a max over
every rank's batches (all-reduced), so each rank computes the one-process scales exactly.

Config keys: `quant.weight.*`, `quant.act.*` (per_token dynamic or per_tensor static),
and under `quant.special`:
  alpha (float in [0, 1], default 0.5): migration strength; 0 keeps the activation
    range, 1 moves all of it into the weights.
  smooth_linear_producers (bool, default false): also smooth linears fed by a linear
    (o_proj from v_proj, with scales tied across query heads that share a value head
    under grouped-query attention; down_proj from up_proj).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.methods.base import QuantMethod, register_method
from llmc.methods.transforms import fold_scales, producer_channels, tie_gqa_scales, transformed_online
from llmc.models.adapter import LinearGroup
from llmc.pipeline.blockwise import BlockContext
from llmc.pipeline.distributed import all_reduce, is_distributed


class SmoothQuantSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Migration strength in [0, 1].")
    smooth_linear_producers: bool = Field(False, description="Also smooth linears fed by a linear (v->o, up->down).")


def is_norm(module: nn.Module) -> bool:
    """A per-channel affine op (LayerNorm, RMSNorm...) rather than a linear."""
    weight = getattr(module, "weight", None)
    return not isinstance(module, nn.Linear) and isinstance(weight, Tensor) and weight.dim() == 1


def smooth_scales(x_max: Tensor, w_max: Tensor, alpha: float) -> Tensor:
    """Eq. 4 of the paper, float32; channels never seen non-zero keep scale 1 (nothing to migrate)."""
    x_max, w_max = x_max.float(), w_max.float().clamp(min=1e-5)
    scales = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    return torch.where(x_max > 0, scales, torch.ones_like(scales))


def weight_absmax(linears: list[nn.Module]) -> Tensor:
    """Per input channel, the largest |weight| over all output rows of all linears."""
    return torch.stack([m.weight.detach().float().abs().amax(dim=0) for m in linears]).amax(dim=0)


def reduce_absmax(stats: dict[str, Tensor], widths: dict[str, int], device: torch.device) -> dict[str, Tensor]:
    """The per-channel maxima of every rank (one MAX reduction); a name no rank saw stays absent."""
    flat = torch.cat([stats[n] if n in stats else torch.full((w,), -1.0, device=device) for n, w in widths.items()])
    all_reduce([flat], dist.ReduceOp.MAX)
    parts = flat.split(list(widths.values()))
    return {n: part for n, part in zip(widths, parts) if part[0] >= 0}


@register_method
class SmoothQuant(QuantMethod):
    name = "SmoothQuant"
    needs_calibration = True
    Special = SmoothQuantSpecial
    float_quant = True
    data_parallel = True  # its statistic, max |X| per channel, is all-reduced (MAX)

    def smoothable(self, ctx: BlockContext) -> list[tuple[LinearGroup, list[nn.Module], nn.Module]]:
        """The groups to smooth in this block: (group, its linears, the producer of their input)."""
        out = []
        for group, mods in ctx.groups():
            if group.prev_op is None or len(mods) != len(group.linears) or transformed_online(mods.values()):
                continue
            prev = ctx.block.get_submodule(group.prev_op)
            if is_norm(prev) or (isinstance(prev, nn.Linear) and self.special.smooth_linear_producers):
                out.append((group, [mods[n] for n in group.linears], prev))
        return out

    @torch.no_grad()
    def input_absmax(self, ctx: BlockContext, names: list[str]) -> dict[str, Tensor]:
        """Per input channel max |X| of each named linear over the calibration set (real tokens only)."""
        if ctx.inputs is None:
            raise RuntimeError("SmoothQuant needs calibration inputs")
        stats: dict[str, Tensor] = {}

        def observe(name: str, rows: Tensor) -> None:
            if rows.numel() == 0:
                return
            cur = rows.detach().abs().amax(dim=0).to(ctx.device, torch.float32)
            stats[name] = cur if name not in stats else torch.maximum(stats[name], cur)

        with ctx.hook_inputs(names, observe, only_real_tokens=True):
            # groups are in execution order; the block's outputs are not needed
            ctx.forward_until(names[-1], inclusive=False)
        if is_distributed():
            stats = reduce_absmax(stats, {n: ctx.block.get_submodule(n).in_features for n in names}, ctx.device)
        return stats

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> None:
        plan = self.smoothable(ctx)
        if plan:
            stats = self.input_absmax(ctx, [group.linears[0] for group, _, _ in plan])
            alpha = self.special.alpha
            for group, linears, prev in plan:
                x_max = stats.get(group.linears[0])
                if x_max is None:
                    continue
                w_max = weight_absmax(linears).to(ctx.device)
                scales = smooth_scales(x_max, w_max, alpha)
                head_dim = None
                out = producer_channels(prev)
                if out != scales.numel():  # grouped-query attention: v_proj is narrower than o_proj's input
                    head_dim = ctx.adapter.block_head_dim(ctx.block)
                    scales = tie_gqa_scales(scales, out, head_dim)
                fold_scales(prev, linears + ctx.readers(group), scales, head_dim)
        for name in ctx.targets:
            self.wrap_linear(ctx, name)
