"""OWQ: outlier-aware weight quantization, the weak columns of each weight kept in float.

Lee et al., 2024, "OWQ: Outlier-Aware Weight Quantization for Efficient Fine-Tuning and Inference
of Large Language Models", AAAI 2024, arXiv:2306.02272 (Section 3). A weight column is "weak" when
quantizing it costs much output error: with H = 2/n X^T X the Hessian of the layer's reconstruction
loss, the sensitivity of input column j is
    sensitivity_j = lambda_j * ||dW_{:,j}||^2,   lambda_j = H_jj,
where dW is the quantization error of the weight (here: of the layer's quantizer on the whole weight).
The `n_outlier` most sensitive columns of each linear stay in float
(`llmc.quant.outliers.OutlierColumnLinear`), and the rest of the weight is quantized with ranges
computed without them. Only weights are quantized in the paper; `quant.act` is allowed (the float
columns' activations then stay float too).

H_jj = 2/n sum_t x_tj^2 over the real calibration tokens, accumulated from one forward of the
float block: the diagonal of `llmc.methods.hessian`'s H, without the [in, in] matrix OWQ does not
need. As in the paper, the remaining columns are solved by GPTQ (Frantar et al., 2022,
arXiv:2210.17323) with the weak columns out of the sweep (`llmc.quant.outliers.gptq_by_group`; H_jj
then comes from each group's Hessian, measured after the earlier groups are solved), or rounded to
nearest with `gptq: false`. The layers with float columns cannot be exported to a real-quantized format; save_fake
works for weight-only runs (the dense fake weight is the model exactly).

Config keys: `quant.weight.{bit, symmetric, granularity, group_size, calib_algo}`, `quant.act.*`,
and `quant.special`:
  n_outlier (8, >= 0): weak columns kept in float per linear (at most all of them);
  target_bit (none): instead of n_outlier, the average bits per weight to reach, as the OWQ code's
    `--target_bit` (e.g. 3.01 with bit 3): n = floor((target_bit - bit) * in_features / (16 - bit));
  gptq (true): GPTQ on the quantized columns; false: round them to nearest;
  percdamp (0.01), blocksize (128), actorder (false), static_groups (false): GPTQ's keys.
"""

from __future__ import annotations

import logging
import math

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import Tensor, nn

from llmc.config.schema import QuantSection
from llmc.errors import ConfigError
from llmc.methods.base import register_method
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.outliers import (
    OutlierColumnMethod,
    OutlierGptqKeys,
    gptq_by_group,
    wrap_by_group,
)

log = logging.getLogger("llmc")


class OwqSpecial(OutlierGptqKeys):
    model_config = ConfigDict(extra="forbid")

    n_outlier: int = Field(8, ge=0, description="Weak columns kept in float per linear.")
    target_bit: float | None = Field(None, gt=0, description="Average bits per weight, instead of n_outlier.")

    @model_validator(mode="after")
    def one_of(self) -> OwqSpecial:
        if self.target_bit is not None and "n_outlier" in self.model_fields_set:
            raise ValueError("give n_outlier or target_bit, not both")
        return self


@torch.no_grad()
def sensitivity(weight: Tensor, quantized: Tensor, hessian_diag: Tensor) -> Tensor:
    """OWQ's per-column sensitivity lambda_j * ||dW_j||^2 (float32)."""
    err = (weight.float() - quantized.float()).pow(2).sum(dim=0)
    return hessian_diag.float() * err


@register_method
class OWQ(OutlierColumnMethod):
    name = "OWQ"
    Special = OwqSpecial

    @property
    def data_parallel(self) -> bool:
        """With `gptq` the weak columns come from diag(H) (reduced over ranks); without, from input stats."""
        return self.special.gptq

    def __init__(self, quant: QuantSection, special: dict | None = None, final: bool = True) -> None:
        super().__init__(quant, special, final)
        bit, target = quant.weight.bit, self.special.target_bit
        if target is not None and not bit < target <= 16:
            raise ConfigError(f"OWQ quant.special.target_bit {target} must lie between quant.weight.bit ({bit}) "
                              f"and 16; e.g. {bit}.01")

    def columns(self, in_features: int) -> int:
        sp = self.special
        if sp.target_bit is None:
            return min(sp.n_outlier, in_features)
        bit = self.quant.weight.bit
        return min(math.floor((sp.target_bit - bit) * in_features / (16 - bit) + 1e-9), in_features)

    def process_block(self, ctx: BlockContext) -> None:
        def choose(absmax: Tensor, meansq: Tensor, module: nn.Module) -> Tensor:
            count = self.columns(module.in_features)
            if not count:
                return torch.empty(0, dtype=torch.long, device=meansq.device)
            wq = self.weight_quantizer.for_dtype(module.weight.dtype)
            score = sensitivity(module.weight, wq.fake_quant(module.weight.detach()), 2 * meansq)
            return score.topk(count).indices.sort().values

        sp = self.special
        counts = gptq_by_group(self, ctx, choose, sp) if sp.gptq else wrap_by_group(self, ctx, choose)
        log.info("OWQ block %d: %d weak columns kept in float over %d linears", ctx.index, sum(counts.values()),
                 len(counts))
