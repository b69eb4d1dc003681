"""Declarations of the supported model families (one entry each; no code)."""

from llmc.models.adapter import LinearGroup, ModelAdapter
from llmc.models.registry import register_adapter

_LLAMA_GROUPS = (
    LinearGroup(
        name="qkv",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        prev_op="input_layernorm",
        inspect="self_attn",
    ),
    LinearGroup(name="o", linears=("self_attn.o_proj",), prev_op="self_attn.v_proj", inspect="self_attn.o_proj"),
    LinearGroup(
        name="gate_up",
        linears=("mlp.gate_proj", "mlp.up_proj"),
        prev_op="post_attention_layernorm",
        inspect="mlp",
    ),
    LinearGroup(name="down", linears=("mlp.down_proj",), prev_op="mlp.up_proj", inspect="mlp.down_proj"),
)


def _llama_like(name: str, model_types: tuple[str, ...], aliases: tuple[str, ...] = ()) -> ModelAdapter:
    return ModelAdapter(
        name=name,
        model_types=model_types,
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        head=("model.norm", "lm_head"),
        groups=_LLAMA_GROUPS,
        aliases=aliases,
    )


LLAMA = register_adapter(_llama_like("Llama", ("llama",), aliases=("SmolLM", "SmolLM2")))
MISTRAL = register_adapter(_llama_like("Mistral", ("mistral",)))
QWEN2 = register_adapter(_llama_like("Qwen2", ("qwen2",)))

OPT = register_adapter(
    ModelAdapter(
        name="OPT",
        model_types=("opt",),
        blocks="model.decoder.layers",
        pre_block=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
        groups=(
            LinearGroup(
                name="qkv",
                linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                prev_op="self_attn_layer_norm",
                inspect="self_attn",
            ),
            LinearGroup(
                name="out", linears=("self_attn.out_proj",), prev_op="self_attn.v_proj", inspect="self_attn.out_proj"
            ),
            LinearGroup(name="fc1", linears=("fc1",), prev_op="final_layer_norm", inspect="fc1"),
            LinearGroup(name="fc2", linears=("fc2",), prev_op="fc1", inspect="fc2"),
        ),
    )
)
