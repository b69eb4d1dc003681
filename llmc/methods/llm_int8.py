"""LLM.int8(): vector-wise int8 with a float mixed-precision decomposition of the outlier features.

Dettmers et al., 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
arXiv:2208.07339 (Section 3.2). The input feature dimensions where some activation has a magnitude
of at least `threshold` (6.0 in the paper) are multiplied in float (weights and activations, the
outlier part of the decomposition); every other feature is quantized vector-wise (per output row
for the weights, per token for the activations: `quant.weight.granularity: per_channel`,
`quant.act.granularity: per_token`, 8 bits).

The paper picks the outlier features per batch at inference. Here they are picked once from the
calibration data (one forward of the float block, real tokens only; the features whose max |x| over
the calibration tokens reaches the threshold), the same for every linear of a group sharing one
input, and fixed: a static choice, so the quantized model is deterministic and its float columns are
known before deployment (`llmc.quant.outliers.OutlierColumnLinear`). A feature that stays below the
threshold in calibration but exceeds it later is quantized. The layers with float columns cannot be
exported to a real-quantized format, nor as dense fake weights when activations are quantized
(refused before calibration).

Config keys (ModelTC/llmc's `LlmInt8`): `quant.weight.{bit, symmetric, granularity}`,
`quant.act.{bit, symmetric, granularity}` (optional; without it, weight-only with float columns),
and `quant.special`:
  threshold (6.0, > 0): the activation magnitude from which a feature is kept in float.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field

from llmc.methods.base import register_method
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.outliers import OutlierColumnMethod, wrap_by_group

log = logging.getLogger("llmc")


class LlmInt8Special(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(6.0, gt=0.0, description="Activation magnitude from which a feature stays in float.")


@register_method
class LlmInt8(OutlierColumnMethod):
    name = "LlmInt8"
    aliases = ("LLM.int8()",)
    Special = LlmInt8Special

    def process_block(self, ctx: BlockContext) -> None:
        threshold = self.special.threshold
        wrapped = wrap_by_group(self, ctx, lambda absmax, meansq, module: (absmax >= threshold).nonzero().flatten())
        log.info("LlmInt8 block %d: %d float input columns over %d linears (threshold %g)", ctx.index,
                 sum(wrapped.values()), len(wrapped), threshold)

