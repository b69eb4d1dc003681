"""The GPTQ checkpoint layout: `save.save_gptq` (folder `gptq_quant_model`).

The layout of AutoGPTQ / GPTQModel (`PackableQuantLinear.pack`), read by transformers' GPTQ
integration (optimum + GPTQModel kernels) and vLLM's `gptq` / `gptq_marlin`. Per quantized linear
`[out, in]` with `G` groups:

* `qweight` int32 `[in * bits / 32, out]`: unsigned codes packed along the input dimension,
  `32 / bits` per word (3-bit: 32 codes in 3 words as one little-endian bit stream);
* `qzeros` int32 `[G, out * bits / 32]`: zero points packed the same way along the output;
* `scales` float16 `[G, out]`; `g_idx` int32 `[in]`: the group of each input column
  (`j // group_size`, or arbitrary after GPTQ act-order, then `desc_act: true`); `bias` float16.

Dequantization (GPTQModel `PackableQuantLinear.dequantize_weight`) is
`scales[g_idx] * (q - zeros[g_idx])` with unsigned `q` in `[0, 2^bits)`. Zero points:

* symmetric: codes shifted by `2^(bits-1)` to unsigned, zero point `2^(bits-1)`, stored the
  classic GPTQ ("v1") way as `zero - 1` (the `0x77777777` words of 4-bit checkpoints):
  `checkpoint_format: gptq`, which every GPTQ consumer reads;
* asymmetric: our zero points may be 0, which v1's `zero - 1` cannot store in a field without
  borrowing from the neighbouring one (the overflow GPTQModel's `convert_gptq_v1_to_v2_format`
  warns about), so they are stored as they are with `checkpoint_format: gptq_v2` (read by GPTQModel,
  hence transformers, and by vLLM since its gptq_v2 support, vllm-project/vllm#26092).

Scales are ours rounded to float16 (see `llmc.export.autoawq` for what that changes: the codes and
zero points are exact). `config.json` carries `quantization_config` and `quantize_config.json`
repeats it for AutoGPTQ-era loaders. Bits 2, 3, 4 and 8; per_group with whole groups or
per_channel (`group_size: -1`); no activation quantization.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmc import __version__
from llmc.config.schema import LlmcConfig
from llmc.errors import ConfigError, ModelError
from llmc.export.base import Exporter, QuantizedLinear, quantized_linears, register_exporter
from llmc.export.int_packing import pack_cols, values_per_block
from llmc.export.packed_checkpoint import (
    float_linear_names,
    fp16_scales,
    integer_zeros,
    natural_order,
    write_packed_checkpoint,
)
from llmc.export.packed_checks import require_weight_only

GPTQ_BITS = (2, 3, 4, 8)


def check_gptq(cfg: LlmcConfig) -> None:
    require_weight_only(cfg, "save_gptq", ("per_group", "per_channel"))
    bit = cfg.quant.weight.bit
    if bit not in GPTQ_BITS:
        raise ConfigError(
            f"save.save_gptq packs 2, 3, 4 or 8-bit weights, not {bit}-bit (GPTQ kernels have no other "
            f"packing); set quant.weight.bit to one of 2, 3, 4, 8"
        )


def gptq_codes_and_zeros(layer: QuantizedLinear) -> tuple[Tensor, Tensor]:
    """Unsigned codes `[out, in]` and integer zero points `[out, G]` with dequant `(q - z) * s`."""
    q = layer.quantizer
    if q.symmetric:
        offset = 2 ** (q.bit - 1)
        return layer.codes + offset, torch.full(layer.zero.shape, offset, dtype=torch.int32)
    return layer.codes, integer_zeros(layer, q.bit)


def pack_gptq_layer(layer: QuantizedLinear) -> dict[str, Tensor]:
    """One linear in the GPTQ layout (qweight, qzeros, scales, g_idx)."""
    q = layer.quantizer
    rows, cols = layer.codes.shape
    unit = values_per_block(q.bit)
    if q.granularity == "per_group" and cols % q.group_size:
        raise ModelError(f"{layer.name}: group_size {q.group_size} does not divide {cols} input features")
    for what, n in (("input", cols), ("output", rows)):
        if n % unit:
            raise ModelError(
                f"{layer.name}: {n} {what} features are not a multiple of {unit}, needed to pack "
                f"{q.bit}-bit GPTQ words; use save_fake or another bit width"
            )
    codes, zero = gptq_codes_and_zeros(layer)
    stored_zero = zero - 1 if q.symmetric else zero  # v1 "zero - 1" (sym, never negative) / gptq_v2
    return {
        "qweight": pack_cols(codes, q.bit).T.contiguous(),  # packed along the input dimension
        "qzeros": pack_cols(stored_zero.T.contiguous(), q.bit),
        "scales": fp16_scales(layer).T.contiguous(),
        "g_idx": layer.g_idx.to(torch.int32),
    }


def gptq_quantization_config(cfg: LlmcConfig, desc_act: bool, only: list[str] | None) -> dict:
    """transformers' GPTQConfig / vLLM's GPTQConfig keys, as GPTQModel writes them."""
    w = cfg.quant.weight
    config = {
        "quant_method": "gptq",
        "bits": w.bit,
        "group_size": w.group_size if w.granularity == "per_group" else -1,
        "desc_act": desc_act,
        "sym": w.symmetric,
        "lm_head": False,
        "checkpoint_format": "gptq" if w.symmetric else "gptq_v2",
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"llmc:{__version__}"]},
    }
    if only is not None:
        config["modules_in_block_to_quantize"] = [only]
    return config


def write_gptq(model: nn.Module, tokenizer: object, folder, cfg: LlmcConfig) -> None:
    layers = quantized_linears(model)
    desc_act = not all(natural_order(layer) for layer in layers)
    # Float linears among the blocks' linears: name the quantized ones explicitly (full names).
    only = [layer.name for layer in layers] if float_linear_names(model) else None
    config = gptq_quantization_config(cfg, desc_act, only)
    write_packed_checkpoint(model, tokenizer, folder, layers, pack_gptq_layer, config, {"quantize_config.json": config})


register_exporter(Exporter("save_gptq", "gptq_quant_model", check_gptq, write_gptq))
