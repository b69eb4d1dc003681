"""Gemma 3 (text, `Gemma3ForCausalLM`): Gemma 2's block layout (see gemma2.py) plus per-head
`q_norm`/`k_norm` on q_proj's and k_proj's outputs (not fold targets; rewritten with the other
`(1 + w)` norms). Sliding-window layers use their own rotary base: each block gets its own mask
and rotary embeddings (captured per layer). Final logits are soft-capped when
`final_logit_softcapping` is set."""

from llmc.models.families.gemma2 import gemma_like
from llmc.models.registry import register_adapter

GEMMA3 = register_adapter(gemma_like("Gemma3", ("gemma3_text",), "Gemma3RMSNorm"))
