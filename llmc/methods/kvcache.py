"""KV-cache quantization: fake-quantize the keys and values attention stores.

Naive: int8 (or another integer width) or FP8 e4m3 with static scales, one per layer (per_tensor) or
per key/value head (per_head), calibrated as the absmax (symmetric; min/max asymmetric) of each
layer's keys and values over the calibration data: scale = absmax / qmax, the `k_scale`/`v_scale`
a serving engine's FP8 or int8 cache uses.

Kivi: Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"
(arXiv:2402.02750): asymmetric, dynamic, keys per channel (over groups of `group_size` tokens),
values per token. The paper's full-precision window of the most recent tokens is left out: every
token is quantized, the harder setting. A key group's range is taken over all its tokens at once,
as the cache holds them once the group is full.

Where: keys before or after RoPE (`post_rope`). Before (the default for runs that export
nothing): the output of the key projection (BlockRoles.attn_k) and of the value projection
(attn_v), through forward hooks; a per-head (or per-tensor) scale on k_proj's output is what a
static pre-RoPE scale can represent (KVQuant, arXiv:2401.18079, also quantizes pre-RoPE keys).
After (the default with save_vllm / save_sgl): the keys and values the attention module
(BlockRoles.attn) hands its cache, after RoPE (`llmc.quant.kvcache.attach_cache`): what vLLM's
FP8 cache quantizes with `k_scale` / `v_scale` and llm-compressor calibrates them on. RoPE
rotates channel pairs, so the two give slightly different per-tensor absmaxes.

Runs after the configured quantization methods (appended by the schedule), so static scales
are observed on the keys and values of the already quantized block. Perplexity at `fake_quant`
is measured with the quantized cache; `transformed` (inside `quant_disabled`) runs it in float.
Models whose adapter declares no separate key projection (fused qkv) are refused. Exports:
save_vllm / save_sgl write Naive FP8 scales (per_tensor, or per_head as compressed-tensors'
`attn_head`) as `kv_cache_scheme` and `k_scale` / `v_scale` (`llmc.export.ct_kvcache`, which
says what is refused: int8, Kivi, pre-RoPE keys); the other formats carry no KV cache and are
refused. A run with it writes no per-block checkpoints (`resumable = False`: a resumed run
would not re-create the cache quantizers).

Config keys (`quant.kvcache`, ModelTC/llmc's names): method (Naive | Kivi), quant_type
(int-quant | float-quant), bit (2..8 or e4m3), symmetric (default true for Naive, false for
Kivi), granularity (Naive: per_tensor | per_head), group_size (Kivi: tokens per key group, -1
the whole sequence); post_rope (llmc's own: quantize keys after RoPE, see above).
"""

from __future__ import annotations

import torch

from llmc.config.schema import SAVE_FLAGS, KVCacheSection, LlmcConfig
from llmc.errors import ConfigError, ModelError
from llmc.methods.lifecycle import CompressionMethod
from llmc.models.adapter import ModelAdapter
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.fp8 import FP8Quantizer
from llmc.quant.kvcache import KVFakeQuant, attach, attach_cache
from llmc.quant.quantizer import IntQuantizer

CT_FLAGS = ("save_vllm", "save_sgl")
"""The exports that carry the cache's scales (compressed-tensors' kv_cache_scheme)."""


def kv_quantizer(kv: KVCacheSection, granularity: str, scale_dtype: torch.dtype | None = None):
    """`scale_dtype` (the model's fp16/bf16): static scales rounded to it, as an export stores them."""
    if kv.quant_type == "float-quant":
        return FP8Quantizer(granularity="per_channel", scale_dtype=scale_dtype)
    gran = "per_tensor" if granularity == "per_tensor" else "per_channel"  # rows are built by KVFakeQuant
    return IntQuantizer(bit=kv.bit, symmetric=kv.symmetric, granularity=gran, scale_dtype=scale_dtype)


class KVCacheQuant(CompressionMethod):
    name = "KVCache"
    resumable = False

    def __init__(self, kv: KVCacheSection, post_rope: bool = False) -> None:
        self.kv = kv
        self.post_rope = post_rope
        self.stage_seconds: dict[str, float] = {}

    @property
    def static(self) -> bool:
        return self.kv.method == "Naive"

    @property
    def needs_calibration(self) -> bool:  # static scales are calibrated; KIVI reads no data
        return self.static

    @property
    def uses_calibration(self) -> bool:
        return self.static

    def granularities(self) -> tuple[str, str]:
        return (self.kv.granularity, self.kv.granularity) if self.static else ("per_channel", "per_token")

    def check_adapter(self, adapter: ModelAdapter) -> None:
        self.projections_of(adapter)
        if self.post_rope and adapter.block_roles.attn is None:
            raise ModelError(f"quant.kvcache.post_rope needs the attention module, which the {adapter.name} adapter "
                             "does not declare (BlockRoles.attn); set quant.kvcache.post_rope: false")

    def projections(self, ctx: BlockContext) -> tuple[str, str]:
        return self.projections_of(ctx.adapter)

    @staticmethod
    def projections_of(adapter: ModelAdapter) -> tuple[str, str]:
        roles = adapter.block_roles
        if roles is None or roles.attn_k is None or roles.attn_v is None:
            raise ModelError(f"quant.kvcache needs separate key and value projections, which the {adapter.name} "
                             "adapter does not declare (BlockRoles.attn_k); remove quant.kvcache")
        return roles.attn_k, roles.attn_v

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> None:
        head_dim = ctx.adapter.block_head_dim(ctx.block)
        dtype = next(p.dtype for p in ctx.block.parameters() if p.is_floating_point())
        mods = [KVFakeQuant(kv_quantizer(self.kv, gran, dtype), gran, head_dim, self.kv.group_size)
                for gran in self.granularities()]
        roles = ctx.adapter.block_roles
        if self.post_rope:
            attach_cache(ctx.block.get_submodule(roles.attn), *mods)
        else:
            for name, kv in zip(self.projections(ctx), mods):
                attach(ctx.block.get_submodule(name), kv)
        if not self.static:
            return
        if ctx.inputs is None:
            raise RuntimeError("static KV-cache scales need calibration inputs")
        for kv in mods:
            kv.observing = True
        ctx.forward_until(roles.attn or self.projections(ctx)[1])
        for kv in mods:
            kv.freeze()


def kvcache_method(cfg: LlmcConfig) -> KVCacheQuant | None:
    """The KV-cache step `quant.kvcache` asks for (None: none), refused where its result would be lost
    (save_vllm / save_sgl are checked by their exporter, `llmc.export.ct_kvcache`)."""
    kv = cfg.quant.kvcache if cfg.quant is not None else None
    if kv is None:
        return None
    flags = [f for f in SAVE_FLAGS if getattr(cfg.save, f) and f not in CT_FLAGS]
    if flags:
        raise ConfigError(f"save.{flags[0]} does not carry a quantized KV cache (only save_vllm / save_sgl write "
                          f"its scales); remove save.{flags[0]} or quant.kvcache")
    exporting = any(getattr(cfg.save, f) for f in CT_FLAGS)
    return KVCacheQuant(kv, post_rope=kv.post_rope if kv.post_rope is not None else exporting)
