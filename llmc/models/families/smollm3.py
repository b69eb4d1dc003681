"""SmolLM3: the Llama layout; every few layers skip rotary embeddings (NoPE, `config.no_rope_layers`),
which changes what attention does with q and k, not which tensor each linear reads."""

from llmc.models.families.llama import llama_like
from llmc.models.registry import register_adapter

SMOLLM3 = register_adapter(llama_like("SmolLM3", ("smollm3",)))
