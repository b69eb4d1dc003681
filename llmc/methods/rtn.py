"""RTN: round-to-nearest weight quantization (llmc's `Naive`).

Each target linear's weight is rounded to the nearest point of its integer grid, with
ranges from `quant.weight.calib_algo` (minmax or mse). It needs no calibration data,
unless static activation ranges are requested. The baseline every method is compared
with (e.g. Dettmers et al., 2022, "LLM.int8()"; Frantar et al., 2022, "GPTQ", Table 1).

Config keys: `quant.weight.{bit, symmetric, granularity, group_size, calib_algo}`,
`quant.act.{bit, symmetric, granularity, static}`; no `quant.special` keys.
"""

from __future__ import annotations

from llmc.methods.base import QuantMethod, register_method
from llmc.pipeline.blockwise import BlockContext


@register_method
class RTN(QuantMethod):
    name = "RTN"
    aliases = ("Naive",)
    needs_calibration = False
    data_parallel = True
    float_quant = True
    module_schemes = True

    def process_block(self, ctx: BlockContext) -> None:
        for name in ctx.targets:
            self.wrap_linear(ctx, name)
