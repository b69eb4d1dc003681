"""compressed-tensors checkpoints of the float formats with group or block scales.

| quant.weight                         | quant.act                                | format               | preset    |
| ------------------------------------ | ---------------------------------------- | -------------------- | --------- |
| nvfp4                                | none / nvfp4 with static: true           | nvfp4-pack-quantized | NVFP4A16 / NVFP4 |
| mxfp4                                | none / mxfp4                             | mxfp4-pack-quantized | MXFP4A16 / MXFP4 |
| mxfp8                                | none / mxfp8                             | mxfp8-quantized      | MXFP8A16 / MXFP8 |
| float-quant e4m3 per_block (B)       | float-quant e4m3 per_group, group_size B | float-quantized      | FP8_BLOCK |

The scheme is compressed-tensors' preset (`PRESET_SCHEMES`), and the tensors go through the
format's registered compressor. Tensors per quantized linear: NVFP4 `weight_packed` (uint8, two
E2M1 codes per byte), `weight_scale` (float8_e4m3fn `[out, in/16]`), `weight_global_scale`
(float32 `[1]`), and `input_global_scale` (float32 `[1]`, the calibrated activation global scale);
MXFP4 `weight_packed`, MXFP8 `weight` (float8_e4m3fn), both with `weight_scale` (uint8 E8M0
exponents `[out, in/32]`); FP8 blocks `weight` (float8_e4m3fn) and `weight_scale`
(`[ceil(out/B), ceil(in/B)]`, in the model's dtype).

Bit-equality: the compressor re-quantizes llmc's fake-quantized weight (computed in float32 from the
layer's codes, so on the grid) with llmc's own scales, and recovers llmc's codes. compressed-tensors
dequantizes NVFP4, MXFP4 and MXFP8 in bfloat16: MX values (a code times a power of two) are exact
there, so they decompress to llmc's weights for any model dtype; NVFP4's `code * scale / global` is
rounded to bfloat16 by the library, which equals llmc's weight bit for bit in bf16 models (float32
models keep the unrounded value in memory). FP8 blocks decompress in the model's dtype, bit-equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmc.config.schema import MICROSCALING, QuantSection
from llmc.quant.fake_linear import FakeQuantLinear

PRESETS = {"nvfp4": ("NVFP4", "NVFP4A16"), "mxfp4": ("MXFP4", "MXFP4A16"), "mxfp8": ("MXFP8", "MXFP8A16")}
FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized"}


def _fp8_blocks(section: object) -> bool:
    return section is not None and section.quant_type == "float-quant" and section.granularity == "per_block"


def _grouped_act(section: object) -> bool:
    return section is not None and (section.quant_type in MICROSCALING or section.granularity == "per_group")


def handles(quant: QuantSection) -> bool:
    """Whether `quant` uses one of the formats of this module (weights or activations)."""
    return quant.weight.quant_type in MICROSCALING or _fp8_blocks(quant.weight) or _grouped_act(quant.act)


def unsupported(quant: QuantSection) -> str | None:
    """Why `quant` (one that `handles`) has no compressed-tensors checkpoint, with the fix; or None."""
    w, a = quant.weight, quant.act
    if w.quant_type in MICROSCALING:
        name = w.quant_type
        if a is not None and a.quant_type != name:
            return (f"{name} weights export weight-only or with {name} activations (compressed-tensors' "
                    f"{PRESETS[name][0]}); set quant.act.quant_type: {name}, or drop quant.act")
        if a is not None and name == "nvfp4" and not a.static:
            return "NVFP4 activations need a calibrated global scale (input_global_scale); set quant.act.static: true"
        return None
    if _fp8_blocks(w):
        b = w.block_size
        if a is None or a.quant_type != "float-quant" or a.granularity != "per_group" or a.group_size != b:
            return (f"FP8 block weights export as compressed-tensors' FP8_BLOCK, with FP8 activations per token "
                    f"group of {b}; set quant.act to quant_type: float-quant, bit: e4m3, granularity: per_group, "
                    f"group_size: {b}")
        return None
    return (f"{a.quant_type} per_group activations export only with matching weights (FP8 blocks, nvfp4, mxfp4, "
            "mxfp8); change quant.weight or quant.act")


def ct_format(quant: QuantSection) -> str:
    w = quant.weight
    return FORMATS[w.quant_type] if w.quant_type in MICROSCALING else "float-quantized"


def ct_scheme(quant: QuantSection):
    """compressed-tensors' preset scheme of `quant`, for every quantized linear."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    w = quant.weight
    if w.quant_type in MICROSCALING:
        preset = PRESETS[w.quant_type][0 if quant.act is not None else 1]
        args = {k: v.model_copy(deep=True) for k, v in PRESET_SCHEMES[preset].items()}
    else:
        args = {k: v.model_copy(deep=True) for k, v in PRESET_SCHEMES["FP8_BLOCK"].items()}
        args["weights"].block_structure = [w.block_size, w.block_size]
        args["input_activations"].group_size = w.block_size
    return QuantizationScheme(targets=["Linear"], format=ct_format(quant), **args)


def module_state(module: FakeQuantLinear, quant: QuantSection, dtype: torch.dtype) -> dict[str, Tensor]:
    """The uncompressed per-module state dict compressed-tensors' compressor of the format expects."""
    wq = module.weight_quantizer
    with torch.no_grad():
        weight = wq.quant_dequant(module.weight.detach().float(), module.w_scale, module.w_zero).cpu()
    scale = module.w_scale.detach().float().cpu()
    if quant.weight.quant_type in MICROSCALING:
        state = {"weight": weight, "weight_scale": scale.reshape(module.out_features, -1)}
        if quant.weight.quant_type == "nvfp4":
            state["weight_global_scale"] = module.w_zero.detach().float().cpu().reshape(-1)[:1].clone()
            if module.act_static and module.a_zero.numel():
                state["input_global_scale"] = module.a_zero.detach().float().cpu().reshape(-1)[:1].clone()
    else:
        state = {"weight": weight, "weight_scale": scale.reshape(wq.blocks(module.weight.shape)).to(dtype)}
    if module.bias is not None:
        state["bias"] = module.bias.detach().cpu()
    return state
