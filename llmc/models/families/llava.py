"""LLaVA (`LlavaForConditionalGeneration`): only the language model is compressed. Its decoder
(a Llama-layout model: Llama, Mistral, Qwen2/3, ...) sits at `model.language_model`, the LM head
at the top; the vision tower and the multi-modal projector stay float and are not declared. Text
calibration never runs the vision tower. Loaded and reloaded with AutoModelForImageTextToText
(transformers has no causal-LM class for it)."""

from llmc.models.adapter import ModelRoles
from llmc.models.families.llama import llama_like
from llmc.models.registry import register_adapter

LM = "model.language_model"

LLAVA = register_adapter(llama_like(
    "Llava",
    ("llava",),
    blocks=f"{LM}.layers",
    pre_block=(f"{LM}.embed_tokens", f"{LM}.rotary_emb"),
    head=(f"{LM}.norm", "lm_head"),
    roles=ModelRoles(embedding=f"{LM}.embed_tokens", final_norm=f"{LM}.norm", lm_head="lm_head",
                     stream_inputs=("model.multi_modal_projector.linear_2",)),
    auto_class="AutoModelForImageTextToText",
))
