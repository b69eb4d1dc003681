"""QUIK: the outlier input features in FP16, every other feature int4 in weights and activations.

Ashkboos et al., 2023, "QUIK: Towards End-to-End 4-Bit Inference on Generative Large Language
Models", arXiv:2310.09259 (Section 3). Per linear, the `fp_features` input features with the
largest activations over the calibration set are kept in float, weights and activations
(`llmc.quant.outliers.OutlierColumnLinear`); the rest of the weight is quantized per output row and
the rest of the input per token (`quant.weight.granularity: per_channel`,
`quant.act.granularity: per_token`, 4 bits in the paper).

Here the features are ranked by their mean squared activation (the squared norm of the feature
over the real calibration tokens, from one forward of the float block), the same columns for the
linears of a group that share an input. As in the paper, the remaining weights are solved by GPTQ
(Frantar et al., 2022, arXiv:2210.17323) with the float columns out of the sweep
(`llmc.quant.outliers.gptq_by_group`; then the features are ranked from each group's Hessian, measured
after the earlier groups are solved), or rounded to nearest with `gptq: false`. Difference from the
paper: down_proj's int8 option (`int8_down_proj`) is not implemented. The layers with float columns cannot be exported to a real-quantized format, nor as
dense fake weights when activations are quantized (refused before calibration).

Config keys (the QUIK reference code's and ModelTC/llmc's names): `quant.weight.*`, `quant.act.*`,
and `quant.special`:
  fp_features (256, >= 0): input features kept in float per linear (at most all of them).
  fp_relative (false): scale fp_features by the linear's input width over the hidden size (the
    width of the block's first group's input), so down_proj keeps proportionally more.
  gptq (true): GPTQ on the quantized columns; false: round them to nearest.
  percdamp (0.01), blocksize (128), actorder (false), static_groups (false): GPTQ's keys.
"""

from __future__ import annotations

import logging

import torch
from pydantic import ConfigDict, Field
from torch import Tensor, nn

from llmc.methods.base import register_method
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.outliers import (
    OutlierColumnMethod,
    OutlierGptqKeys,
    gptq_by_group,
    wrap_by_group,
)

log = logging.getLogger("llmc")


class QuikSpecial(OutlierGptqKeys):
    model_config = ConfigDict(extra="forbid")

    fp_features: int = Field(256, ge=0, description="Input features kept in float per linear.")
    fp_relative: bool = Field(False, description="Scale fp_features by the input width over the hidden size.")


def top_features(meansq: Tensor, count: int) -> Tensor:
    """The indices of the `count` features with the largest mean squared activation."""
    count = min(count, meansq.numel())
    if not count:
        return torch.empty(0, dtype=torch.long, device=meansq.device)
    return meansq.topk(count).indices.sort().values


@register_method
class QUIK(OutlierColumnMethod):
    name = "QUIK"
    Special = QuikSpecial

    def process_block(self, ctx: BlockContext) -> None:
        sp = self.special
        groups = ctx.groups()
        hidden = next(iter(groups[0][1].values())).in_features if groups else 1

        def choose(absmax: Tensor, meansq: Tensor, module: nn.Module) -> Tensor:
            count = round(sp.fp_features * meansq.numel() / hidden) if sp.fp_relative else sp.fp_features
            return top_features(meansq, count)

        counts = gptq_by_group(self, ctx, choose, sp) if sp.gptq else wrap_by_group(self, ctx, choose)
        log.info("QUIK block %d: %d float input columns over %d linears", ctx.index, sum(counts.values()), len(counts))
