"""AutoAWQ's GEMM checkpoint layout: `save.save_autoawq` and `save.save_mlcllm`.

The layout is AutoAWQ's `WQLinear_GEMM` (casper-hansen/AutoAWQ, `awq/modules/linear/gemm.py`,
`from_linear`), read by transformers' AWQ integration (through GPTQModel's AWQ kernels), vLLM's
`awq` / `awq_marlin` and MLC-LLM's AWQ converter. Per quantized linear `[out, in]`:

* `qweight` int32 `[in, out / 8]`: the unsigned 4-bit codes, transposed, 8 per word along the
  output dimension in AWQ's interleaved order [0, 2, 4, 6, 1, 3, 5, 7];
* `qzeros` int32 `[in / group_size, out / 8]`: the integer zero points, packed the same way;
* `scales` float16 `[in / group_size, out]`; `bias` float16; every other tensor float16.

Dequantization (AutoAWQ `awq/utils/packing_utils.py`, `dequantize_gemm`) is
`(q - z) * s` per group of `group_size` consecutive input features, so only 4-bit asymmetric
per-group weights with whole groups and no activation quantization fit; GPTQ act-order (columns
in arbitrary groups) has no `g_idx` here. `config.json` gets AutoAWQ's
`AwqConfig.to_transformers_dict()`: `{quant_method: awq, zero_point: true, group_size, bits: 4,
version: gemm, modules_to_not_convert}`.

Scales: the codes and zero points are exactly the fake-quantized model's; the scales are ours
rounded to float16, the only dtype the layout has. The saved weights therefore dequantize to
`(codes - zero) * fp16(scale)`, which differs from the float32 fake weight by at most
`15 * |scale - fp16(scale)|` (relative 2^-11 of a scale step); the tests check the first
equality bit for bit and measure the difference.

llmc writes the same folder for `save_mlcllm` (`mlcllm_quant_model`): MLC-LLM converts AutoAWQ
checkpoints (its `awq` quantization source format) rather than a format of its own.
"""

from __future__ import annotations

from torch import Tensor, nn

from llmc.config.schema import LlmcConfig
from llmc.errors import ConfigError, ModelError
from llmc.export.base import Exporter, QuantizedLinear, quantized_linears, register_exporter
from llmc.export.int_packing import pack_awq
from llmc.export.packed_checkpoint import (
    float_linear_names,
    fp16_scales,
    integer_zeros,
    natural_order,
    write_packed_checkpoint,
)
from llmc.export.packed_checks import arbitrary_groups, require_weight_only

AWQ_BITS = 4


def awq_quantization_config(group_size: int, modules_to_not_convert: list[str] | None) -> dict:
    """AutoAWQ's `AwqConfig.to_transformers_dict()` (awq/models/_config.py), key for key."""
    return {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": group_size,
        "bits": AWQ_BITS,
        "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert,
    }


def check_awq(cfg: LlmcConfig, key: str) -> None:
    require_weight_only(cfg, key, ("per_group",))
    w = cfg.quant.weight
    if w.bit != AWQ_BITS:
        raise ConfigError(
            f"save.{key} (AutoAWQ GEMM) stores 4-bit weights only, not {w.bit}-bit; set quant.weight.bit: 4 "
            f"or use save_gptq for 2, 3 and 8 bits"
        )
    if w.symmetric:
        raise ConfigError(
            f"save.{key} (AutoAWQ GEMM) stores asymmetric weights with zero points; "
            f"set quant.weight.symmetric: false, or use save_gptq for symmetric weights"
        )
    if arbitrary_groups(cfg):
        raise ConfigError(
            f"save.{key} (AutoAWQ GEMM) has no g_idx for GPTQ act-order groups; set quant.special "
            f"static_groups: true (or actorder: false), or use save_gptq"
        )


def pack_awq_layer(layer: QuantizedLinear) -> dict[str, Tensor]:
    """One linear in the GEMM layout: qweight `[in, out/8]`, qzeros `[groups, out/8]`, scales `[groups, out]`."""
    q = layer.quantizer
    rows, cols = layer.codes.shape
    if q.bit != AWQ_BITS or q.symmetric or q.granularity != "per_group" or cols % q.group_size:
        raise ModelError(f"{layer.name}: only 4-bit asymmetric whole groups fit AutoAWQ's GEMM layout")
    if not natural_order(layer):
        raise ModelError(f"{layer.name}: act-order groups (g_idx) do not fit AutoAWQ's GEMM layout; use save_gptq")
    if rows % 8:
        raise ModelError(f"{layer.name}: {rows} output features are not a multiple of 8, needed by AutoAWQ")
    zero = integer_zeros(layer, AWQ_BITS)
    return {
        "qweight": pack_awq(layer.codes.T.contiguous()),
        "qzeros": pack_awq(zero.T.contiguous()),
        "scales": fp16_scales(layer).T.contiguous(),
    }


def write_awq(model: nn.Module, tokenizer: object, folder, cfg: LlmcConfig) -> None:
    skipped = float_linear_names(model) or None
    config = awq_quantization_config(cfg.quant.weight.group_size, skipped)
    write_packed_checkpoint(model, tokenizer, folder, quantized_linears(model), pack_awq_layer, config)


register_exporter(Exporter("save_autoawq", "autoawq_quant_model", lambda cfg: check_awq(cfg, "save_autoawq"), write_awq))
register_exporter(Exporter("save_mlcllm", "mlcllm_quant_model", lambda cfg: check_awq(cfg, "save_mlcllm"), write_awq))
