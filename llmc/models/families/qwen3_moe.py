"""Qwen3-MoE: the Qwen3 attention (per-head q/k norms, not fold targets) and Qwen2-MoE's sparse
block without the shared expert: a float router `mlp.gate` and fused experts split into
`mlp.experts.#.gate_proj`, `up_proj`, `down_proj` (llmc.models.moe); layers in `mlp_only_layers`
or off the `decoder_sparse_step` have a dense MLP."""

from llmc.models.families.qwen2_moe import qwen_moe
from llmc.models.registry import register_adapter

QWEN3_MOE = register_adapter(qwen_moe("Qwen3MoE", "qwen3_moe", shared=False, aliases=("Qwen3_MoE",)))
