"""DGQ: dual-grained W4A8, 4-bit weights with int8 group scales under per-channel float scales.

Luoming Zhang et al., 2023, "Dual Grained Quantization: Efficient Fine-Grained Quantization for LLM",
ICLR 2024, arXiv:2310.04836; also in ModelTC/llmc (`DGQ`).
Each weight is `c_o * k_og * (q - z_og)`: a float scale per output channel, an integer group scale
`k` (1..127) per group of input features, 4-bit codes, and `k * (q - z)` within int8, so the int4
weight becomes int8 in integer arithmetic and the layer runs as an int8 GEMM with int8 per-token
activations (`llmc.quant.dual_grained`). With `search` (the paper's two-phase grid search, scored on
the layer's output error over the calibration inputs, `||X dW^T||^2` through `H = X^T X`):
  1. per group, a clipping ratio of the group's range (`clip_grid` ratios in 1.0..0.8), with float
     group scales, scored on the group's own output (the diagonal block of H);
  2. per output channel, the ratio shrinking the channel scale (`grid` ratios in 1.0..0.2): a smaller
     channel scale gives finer integer group scales but fewer codes within int8; scored on the
     channel's whole output.
Without `search` the ranges are min/max (no calibration data read unless activations are static).
Differences from llmc's DGQ: the search scores float inputs (llmc quantizes them first); the zero
point is recomputed for the final step `c * k` (llmc keeps phase 1's); the code bound is
`floor(127 / k)` (llmc rounds, which can leave int8); llmc's built-in SmoothQuant step is not part
of the method: compose `method: [SmoothQuant, DGQ]` for it.

Config keys: `quant.weight.{bit, symmetric, group_size, calib_algo}` (llmc's `quant.weight.w_1`;
granularity per_group, calib_algo minmax or percentile), `quant.act.{bit, granularity}` (W4A8:
`bit: 8, granularity: per_token`), `quant.special`:
  scale_bit (8; llmc's `quant.weight.w_2.bit`): bits of the group scales and of the int values;
  search (true): the two-phase grid search; grid (80): channel-scale ratios; clip_grid (20): group
    clipping ratios.
No real-quantized format stores this layout: only save_trans and save_fake (dense) are written.
"""

from __future__ import annotations

import logging

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.config.schema import QuantSection
from llmc.errors import ConfigError, ModelError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.hessian import group_hessians
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.dual_grained import DualGrainedQuantizer, dual_grained
from llmc.quant.fake_linear import FakeQuantLinear

log = logging.getLogger("llmc")

DENSE_FLAGS = ("save_trans", "save_fake")


class DgqSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale_bit: int = Field(8, ge=4, le=8, description="Bits of the integer group scales (int8).")
    search: bool = Field(True, description="The paper's two-phase grid search on the calibration data.")
    grid: int = Field(80, ge=1, description="Channel-scale ratios of phase 2.")
    clip_grid: int = Field(20, ge=1, description="Group clipping ratios of phase 1.")


def output_error(dw: Tensor, hessian: Tensor) -> Tensor:
    """Per output row, `sum_t (x_t . dw_row)^2` = `dw H dw^T` on the diagonal (`[out, 1]`)."""
    return ((dw @ hessian) * dw).sum(dim=1, keepdim=True)


@torch.no_grad()
def search_group_clip(weight: Tensor, hessian: Tensor, q: DualGrainedQuantizer, grid: int) -> Tensor:
    """Phase 1: per group (`[rows, 1]`), the clipping ratio whose float-scaled group has the lowest error
    on the group's own output (diagonal blocks of H)."""
    w = weight.float()
    out, n, g = w.shape[0], q.groups_per_row(w.shape), q.group_size
    pad = n * g - w.shape[1]
    h = torch.nn.functional.pad(hessian, (0, pad, 0, pad))
    blocks = torch.stack([h[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(n)])  # [n, g, g]
    rows = q.rows(w)
    xmin, xmax = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    best_err = torch.full((rows.shape[0], 1), float("inf"), device=w.device)
    best = torch.ones_like(best_err)
    for i in range(grid):
        ratio = 1.0 - i / grid * 0.2
        s, z = q.float_params(xmin * ratio, xmax * ratio)
        dw = (q.float_qdq(rows, s, z) - rows).reshape(out, n, g)
        err = torch.einsum("ong,ngh,onh->on", dw, blocks, dw).reshape(-1, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


@torch.no_grad()
def search_channel_scale(weight: Tensor, hessian: Tensor, q: DualGrainedQuantizer, clip: Tensor | None,
                         grid: int) -> tuple[Tensor, Tensor]:
    """Phase 2: per output channel, the shrunk channel scale with the lowest output error; the
    parameters `(scale, zero)` of every group."""
    w = weight.float()
    n = q.groups_per_row(w.shape)
    best_err = torch.full((w.shape[0], 1), float("inf"), device=w.device)
    best_scale = best_zero = None
    # The unclipped groups compete too, so the result is never worse than min/max.
    for group_clip in (None, clip) if clip is not None else (None,):
        for i in range(grid):
            scale, zero = q.channel_params(w, 1.0 - i / grid * 0.8, group_clip)
            err = output_error(q.quant_dequant(w, scale, zero) - w, hessian)
            better = (err < best_err).repeat_interleave(n, dim=0)
            best_err = torch.minimum(err, best_err)
            best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
            best_zero = zero if best_zero is None else torch.where(better, zero, best_zero)
    return best_scale, best_zero


@register_method
class DGQ(QuantMethod):
    name = "DGQ"
    quantizes_only = True
    Special = DgqSpecial
    needs_calibration = True

    def __init__(self, quant: QuantSection, special: dict | None = None, final: bool = True) -> None:
        super().__init__(quant, special, final)
        w = quant.weight
        if w.granularity != "per_group":
            raise ConfigError(f"DGQ's weights are per_group (int8 group scales under channel scales), not "
                              f"{w.granularity}; set quant.weight.granularity: per_group")
        if w.calib_algo not in ("minmax", "percentile"):
            raise ConfigError(f"DGQ searches its own ranges; quant.weight.calib_algo {w.calib_algo} is not "
                              f"supported: use minmax or percentile")
        self.dual_quantizer = dual_grained(self.weight_quantizer, self.special.scale_bit)

    @property
    def uses_calibration(self) -> bool:
        return self.special.search or (self.quant.act is not None and self.quant.act.static)

    def export_refusal(self, save_flags: list[str]) -> str | None:
        other = [f for f in save_flags if f not in DENSE_FLAGS]
        if other:
            return (f"DGQ's int8 group scales under per-channel scales have no real-quantized format "
                    f"(save.{other[0]}); use save_fake or save_trans, or remove save.{other[0]}")
        return None

    def wrap_linear(self, ctx: BlockContext, name: str) -> FakeQuantLinear:
        return self.restore_linear(ctx.block, name, FakeQuantLinear)

    def restore_linear(self, block: nn.Module, name: str, cls: type[FakeQuantLinear]) -> FakeQuantLinear:
        return cls.wrap(block, name, self.dual_quantizer, self.act_quantizer,
                        act_static=self.quant.act is not None and self.quant.act.static)

    def process_block(self, ctx: BlockContext) -> None:
        sp = self.special
        groups = [list(mods.items()) for _, mods in ctx.groups()]
        hessians = group_hessians(ctx, groups)[0] if sp.search and groups else [None] * len(groups)
        before = after = 0.0
        for group, hessian in zip(groups, hessians):
            for name, linear in group:
                if linear.in_features < self.dual_quantizer.group_size and not self.quant.weight.partial_group:
                    raise ModelError(f"DGQ: group_size {self.dual_quantizer.group_size} exceeds the "
                                     f"{linear.in_features} inputs of {name}; use a smaller group_size")
                fq = self.wrap_linear(ctx, name)
                if hessian is None:
                    continue
                q, w = fq.weight_quantizer, fq.weight.detach()
                before += output_error(fq.fake_weight().float() - w.float(), hessian).sum().item()
                clip = search_group_clip(w, hessian, q, sp.clip_grid)
                fq.set_weight_qparams(*search_channel_scale(w, hessian, q, clip, sp.grid))
                after += output_error(fq.fake_weight().float() - w.float(), hessian).sum().item()
        if sp.search and groups:
            log.info("DGQ block %d: output error %.4g -> %.4g after the scale search", ctx.index, before, after)
