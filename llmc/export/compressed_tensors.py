"""compressed-tensors checkpoints for vLLM (`save.save_vllm`) and SGLang (`save.save_sgl`).

The checkpoint is written with the compressed-tensors library itself: every quantized
linear's weight, scale and zero point go through the registered compressor of the format
(`pack-quantized`, `int-quantized` or `float-quantized`, see `llmc.export.ct_scheme`), and
`ModelCompressor.update_config` writes `quantization_config` into config.json. Both serving
engines read the same layout; only the subfolder differs.

Tensors per quantized linear (compressed-tensors' names): `weight_packed` (int32, 32/bits
codes per word) + `weight_shape` for pack-quantized, or `weight` (int8 / float8_e4m3fn);
`weight_scale` `[out, groups]` (`[out, 1]` per channel, `[1]` per tensor) in the model's dtype;
`weight_zero_point` (asymmetric only; packed int32 along the output dim, codes shifted to the
signed range); `input_scale` `[1]` for static activations. NVFP4, MXFP4, MXFP8 and FP8 blocks:
`llmc.export.ct_formats`. Every other tensor (embeddings,
norms, lm_head, linears left in float) is saved as it is in the model, in the model's dtype.

Dtype and bit-equality: scales are stored in the model's dtype, as compressed-tensors itself
initializes them. For float32 models that is exact. For fp16/bf16 models FakeQuantLinear
rounds its scales to that dtype (`IntQuantizer.scale_dtype`, `representable_scale`), so compressed-tensors'
dequantization `(code - zero) * scale` in that dtype equals llmc's fake-quantized weight.

Pruned models (a `sparse:` section, with or without quant) are written as `llmc.export.ct_sparse`
describes: zeros stored as they are, the sparsity recorded under config.json's `llmc_sparsity`.
Online input transforms (QuaRot's Hadamard before down_proj) go into `transform_config`
(`llmc.export.ct_transform`). A quantized KV cache (`quant.kvcache`, FP8) goes into
`kv_cache_scheme` with per-attention `k_scale` / `v_scale` (`llmc.export.ct_kvcache`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from llmc.config.schema import LlmcConfig
from llmc.errors import ConfigError
from llmc.export import ct_formats, ct_kvcache
from llmc.export.base import Exporter, register_exporter
from llmc.export.ct_scheme import ct_format, ct_scheme, is_float, unsupported
from llmc.export.ct_sparse import add_sparsity_record, sparsity_record, write_pruned_dense
from llmc.export.ct_transform import transform_config
from llmc.quant.fake_linear import FakeQuantLinear, fake_quant_modules

log = logging.getLogger("llmc")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the first one found)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def module_state(module: FakeQuantLinear, quant, dtype: torch.dtype) -> dict[str, Tensor]:
    """The uncompressed per-module state dict compressed-tensors expects (local names).

    `weight` is llmc's fake-quantized weight in float32: it lies on the quantization grid, so
    the compressor's quantize step recovers llmc's codes exactly.
    """
    if ct_formats.handles(quant):  # NVFP4, MXFP4, MXFP8, FP8 blocks
        return ct_formats.module_state(module, quant, dtype)
    w = quant.weight
    rows = module.out_features
    with torch.no_grad():
        weight = module.fake_weight().detach().float().cpu()
    shape = (1,) if w.granularity == "per_tensor" else (rows, -1)
    scale = module.w_scale.detach().float().cpu().reshape(shape)
    zero = module.w_zero.detach().float().cpu().reshape(shape)
    state = {"weight": weight, "weight_scale": scale.to(dtype)}
    if not is_float(w) and not w.symmetric:
        # llmc's asymmetric codes are 0..2^b-1; compressed-tensors' are signed, zero point shifted alike.
        state["weight_zero_point"] = (zero - 2 ** (w.bit - 1)).to(torch.int8)
    if module.bias is not None:
        state["bias"] = module.bias.detach().cpu()
    if module.act_static and module.a_scale.numel():
        state["input_scale"] = module.a_scale.detach().float().cpu().reshape(1).to(dtype)
    return state


def compressed_state_dict(model: nn.Module, cfg: LlmcConfig) -> tuple[dict[str, Tensor], list[str]]:
    """The whole checkpoint's tensors, and the names of the linears left in float (`ignore`)."""
    return compressed_tensors_of(model, cfg, model_dtype(model)), ignore_list(model, cfg)


def compressed_tensors_of(module: nn.Module, cfg: LlmcConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of `module` (the model, or one block of a streamed run) with every fake-quant
    linear compressed."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = ct_scheme(cfg.quant)
    compressor = BaseCompressor.get_value_from_registry(ct_format(cfg.quant))
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    for name, fq in fake_quant_modules(module):
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        local = compressor.compress(module_state(fq, cfg.quant, dtype), scheme)
        state.update({f"{name}.{k}": v.contiguous() for k, v in local.items()})
    return state


def ignore_list(model: nn.Module, cfg: LlmcConfig) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + float_role_patterns(model, cfg)


def float_role_patterns(model: nn.Module, cfg: LlmcConfig) -> list[str]:
    """`ignore` patterns for the modules the adapter leaves float on purpose (MoE routers). They are
    matched by their last name only, because the checkpoint may name their parents differently from
    the loaded model (transformers saves Mixtral's `mlp.gate` as `block_sparse_moe.gate`), and a
    serving engine that finds a router it is told to quantize but that has no quantized tensors fails."""
    from llmc.models import get_adapter

    adapter = get_adapter(cfg.model.type, getattr(model.config, "model_type", None))
    leaves = dict.fromkeys(name.rsplit(".", 1)[-1] for name in adapter.float_linears)
    return [f"re:.*\\.{re.escape(leaf)}$" for leaf in leaves]


def quantization_config(cfg: LlmcConfig, ignore: list[str]):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    return QuantizationConfig(
        config_groups={"group_0": ct_scheme(cfg.quant)},
        format=ct_format(cfg.quant),
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
        kv_cache_scheme=ct_kvcache.kv_cache_scheme(cfg.quant.kvcache),
    )


def write_checkpoint(model: nn.Module, tokenizer: object, folder: Path, cfg: LlmcConfig) -> None:
    """Write a complete compressed-tensors checkpoint folder (config, safetensors, tokenizer)."""
    from compressed_tensors.compressors import ModelCompressor

    if cfg.quant is None:
        write_pruned_dense(model, tokenizer, folder, cfg)
        return
    if not fake_quant_modules(model):
        raise ConfigError("the model has no quantized linears to export; check quant.ignored_layers")
    record = sparsity_record(model, cfg)
    state, ignore = compressed_state_dict(model, cfg)
    transforms, transform_state = transform_config(model, model_dtype(model))  # QuaRot's online Hadamard
    state.update(transform_state)
    state.update(ct_kvcache.kv_scales(model, cfg.quant.kvcache, model_dtype(model)))  # k_scale / v_scale
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    ModelCompressor(quantization_config=quantization_config(cfg, ignore),
                    transform_config=transforms).update_config(str(folder))
    add_sparsity_record(folder, record)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


def check_config(key: str):
    def check(cfg: LlmcConfig) -> None:
        problem = unsupported(cfg)
        if problem is not None:
            raise ConfigError(f"save.{key}: {problem}")
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise ConfigError(f"save.{key} needs the compressed-tensors package; pip install compressed-tensors") from None

    return check


register_exporter(Exporter("save_vllm", "vllm_quant_model", check_config("save_vllm"), write_checkpoint))
register_exporter(Exporter("save_sgl", "sgl_quant_model", check_config("save_sgl"), write_checkpoint))
