"""The quantized KV cache in a compressed-tensors checkpoint (save_vllm / save_sgl).

compressed-tensors carries a static KV cache as `quantization_config.kv_cache_scheme` (one
`QuantizationArgs`: num_bits 8, type float, symmetric, dynamic false, strategy `tensor` or
`attn_head`) and, per attention module, `k_scale` / `v_scale` tensors next to its projections
(`model.layers.0.self_attn.k_scale`), in the model's dtype: shape `[1]` per tensor,
`[kv_heads, 1, 1]` per head (compressed-tensors' `initialize_qparams`). The scale is
`absmax / 448`: the cache stores `fp8(key / k_scale)`. vLLM applies `k_scale` to the keys after
RoPE (what its attention writes to the cache), so llmc calibrates them there (`post_rope`), and
vLLM's loader takes FP8 only, symmetric, tensor or attn_head (`CompressedTensorsKVCacheMethod`).

Refused, one line each: integer caches (vLLM's compressed-tensors cache is FP8), Kivi (dynamic
per-channel keys and per-token values: no static scale to store), keys calibrated before RoPE.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmc.config.schema import KVCacheSection, LlmcConfig
from llmc.quant.kvcache import cache_quants

STRATEGY = {"per_tensor": "tensor", "per_head": "attn_head"}


def unsupported(cfg: LlmcConfig) -> str | None:
    """Why `quant.kvcache` cannot go into a compressed-tensors checkpoint (with the fix), or None."""
    kv = cfg.quant.kvcache if cfg.quant is not None else None
    if kv is None:
        return None
    if kv.method == "Kivi":
        return ("quant.kvcache method Kivi (dynamic per-channel keys, per-token values) has no compressed-tensors "
                "format; use method: Naive with quant_type: float-quant, or remove quant.kvcache")
    if kv.quant_type != "float-quant":
        return ("vLLM's compressed-tensors KV cache is FP8 only; set quant.kvcache quant_type: float-quant, "
                "bit: e4m3, or remove quant.kvcache")
    if kv.post_rope is False:
        return ("quant.kvcache.post_rope: false calibrates k_scale before RoPE but vLLM scales keys after it; "
                "remove post_rope (it defaults to true when exporting)")
    return None


def kv_cache_scheme(kv: KVCacheSection | None):
    """The `kv_cache_scheme` of quantization_config (None without quant.kvcache)."""
    from compressed_tensors.quantization import QuantizationArgs

    if kv is None:
        return None
    return QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                            strategy=STRATEGY[kv.granularity])


def kv_scales(model: nn.Module, kv: KVCacheSection | None, dtype: torch.dtype) -> dict[str, Tensor]:
    """`{attention}.k_scale` / `{attention}.v_scale` of every attention quantized at its cache."""
    if kv is None:
        return {}
    quants = cache_quants(model)
    if not quants:
        raise RuntimeError("quant.kvcache is set but no attention module quantizes its cache")
    shape = (1,) if kv.granularity == "per_tensor" else (-1, 1, 1)
    state = {}
    for name, quant in quants:
        for key, fq in (("k_scale", quant.key), ("v_scale", quant.value)):
            if fq.scale is None:
                raise RuntimeError(f"{name}: the KV cache scales were never calibrated")
            state[f"{name}.{key}"] = fq.scale.detach().float().cpu().reshape(shape).to(dtype)
    return state
