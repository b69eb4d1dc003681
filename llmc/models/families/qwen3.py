"""Qwen3: the Llama layout plus per-head RMSNorms (`self_attn.q_norm`, `self_attn.k_norm`) applied
to q_proj's and k_proj's outputs. They are not fold targets (a norm re-normalizes whatever scale
reaches it): q, k and v still read one tensor, `input_layernorm`'s output, and scales fold there."""

from llmc.models.families.llama import llama_like
from llmc.models.registry import register_adapter

QWEN3 = register_adapter(llama_like("Qwen3", ("qwen3",)))
