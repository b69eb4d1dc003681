"""AdaDim: per linear, quantize along the input or the output dimension, whichever errs less.

Jung Hwan Heo et al., 2024, "Rethinking Channel Dimensions to Isolate Outliers for Low-bit Weight
Quantization of Large Language Models", ICLR 2024, arXiv:2309.15531 (adaptive dimensions); also in
ModelTC/llmc (`AdaDim`). Activation outliers sit in a few
input channels, and the weights those channels meet are often large too: a scale shared along the
input dimension (the usual per-channel or per-group over in-features) then spends its range on a
few columns, while scales along the output dimension (per input channel, or per group of
`group_size` consecutive outputs of one input column: the layout quantizes W^T) isolate each
outlier column in its own scales. AdaDim quantizes each linear both ways (RTN here; the paper also
combines the choice with GPTQ and AWQ) and keeps the one with the lower output error on the
calibration inputs, `sum_t ||x_t dW^T||^2` through `H = X^T X`. The choice per linear is logged,
and kept in `choices` ("input" / "output", keyed "block.name").

Config keys: `quant.weight.{bit, symmetric, granularity (per_channel or per_group), group_size,
calib_algo}` (llmc's AdaDim config: `bit: 8, symmetric: True, granularity: per_channel`),
`quant.act.*` optional; no `quant.special` keys. Output-dimension grouping has no real-quantized
format (compressed-tensors, AutoAWQ, GPTQ and MLC-LLM group input features): only save_trans and
save_fake (dense) are written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmc.config.schema import QuantSection
from llmc.errors import ConfigError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.dgq import DENSE_FLAGS, output_error
from llmc.methods.hessian import group_hessians
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.quantizer import IntQuantizer

log = logging.getLogger("llmc")


@dataclass(frozen=True)
class OutputDimQuantizer(IntQuantizer):
    """An `IntQuantizer` of W^T: per_channel is one scale per input channel, per_group groups
    `group_size` consecutive output rows of one input column."""

    def rows(self, x: Tensor) -> Tensor:
        return super().rows(x.transpose(-2, -1))

    def unrows(self, rows: Tensor, shape: torch.Size) -> Tensor:
        return super().unrows(rows, torch.Size((*shape[:-2], shape[-1], shape[-2]))).transpose(-2, -1)


class OutputGroupedLinear(FakeQuantLinear):
    """A FakeQuantLinear whose weight scales run along the output dimension (the class marks the
    choice in a resume checkpoint)."""


@register_method
class AdaDim(QuantMethod):
    name = "AdaDim"
    quantizes_only = True
    needs_calibration = True
    state_attrs = ("stage_seconds", "choices")

    def __init__(self, quant: QuantSection, special: dict | None = None, final: bool = True) -> None:
        super().__init__(quant, special, final)
        w = quant.weight
        if w.granularity not in ("per_channel", "per_group"):
            raise ConfigError(f"AdaDim chooses the dimension scales run along; granularity {w.granularity} has "
                              f"none: set quant.weight.granularity: per_channel or per_group")
        wq = self.weight_quantizer
        self.output_quantizer = OutputDimQuantizer(**{f: getattr(wq, f) for f in wq.__dataclass_fields__})
        self.choices: dict[str, str] = {}
        """"input" or "output" per linear, keyed "block index.name"."""

    def export_refusal(self, save_flags: list[str]) -> str | None:
        other = [f for f in save_flags if f not in DENSE_FLAGS]
        if other:
            return (f"AdaDim's output-dimension groups have no real-quantized format (save.{other[0]} groups "
                    f"input features); use save_fake or save_trans, or remove save.{other[0]}")
        return None

    def restore_linear(self, block: nn.Module, name: str, cls: type[FakeQuantLinear]) -> FakeQuantLinear:
        wq = self.output_quantizer if issubclass(cls, OutputGroupedLinear) else self.weight_quantizer
        return cls.wrap(block, name, wq, self.act_quantizer,
                        act_static=self.quant.act is not None and self.quant.act.static)

    def process_block(self, ctx: BlockContext) -> None:
        groups = [list(mods.items()) for _, mods in ctx.groups()]
        hessians = group_hessians(ctx, groups)[0] if groups else []
        picked = {"input": 0, "output": 0}
        for group, hessian in zip(groups, hessians):
            for name, linear in group:
                errs = {}
                for dim, cls in (("input", FakeQuantLinear), ("output", OutputGroupedLinear)):
                    if dim == "output" and not self._output_fits(linear):
                        continue
                    fq = self.restore_linear(ctx.block, name, cls)
                    errs[dim] = output_error(fq.fake_weight().float() - fq.weight.float(), hessian).sum().item()
                dim = min(errs, key=errs.get)  # ties keep the input dimension (exportable layouts)
                if dim == "input" and len(errs) > 1:
                    self.restore_linear(ctx.block, name, FakeQuantLinear)
                self.choices[f"{ctx.index}.{name}"] = dim
                picked[dim] += 1
        log.info("AdaDim block %d: %d linears grouped along the input, %d along the output dimension",
                 ctx.index, picked["input"], picked["output"])

    def _output_fits(self, linear: nn.Module) -> bool:
        """Whether groups of `group_size` outputs tile the linear (else only the input dimension is tried)."""
        w = self.quant.weight
        return w.granularity != "per_group" or w.partial_group or linear.out_features % w.group_size == 0
