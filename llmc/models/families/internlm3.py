"""InternLM3: transformers loads it as `LlamaForCausalLM` (module names q/k/v/o_proj,
gate/up/down_proj); its config (`model_type: internlm3`) only renames the bias switches
(`qkv_bias`, `bias`)."""

from llmc.models.families.llama import llama_like
from llmc.models.registry import register_adapter

INTERNLM3 = register_adapter(llama_like("InternLM3", ("internlm3",)))
