"""Llama-layout families: pre-norm attention (q/k/v/o) and a gated MLP (gate/up/down),
embeddings at `model.embed_tokens`, rotary embedding at `model.rotary_emb`."""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.registry import register_adapter

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
O_GROUP = LinearGroup(name="o", linears=("self_attn.o_proj",), prev_op="self_attn.v_proj", inspect="self_attn.o_proj")


def llama_groups(mlp_norm: str = "post_attention_layernorm") -> tuple[LinearGroup, ...]:
    """q/k/v after `input_layernorm`, o after v, gate/up after `mlp_norm`, down after up."""
    return (
        LinearGroup(name="qkv", linears=QKV, prev_op="input_layernorm", inspect="self_attn"),
        O_GROUP,
        LinearGroup(name="gate_up", linears=("mlp.gate_proj", "mlp.up_proj"), prev_op=mlp_norm, inspect="mlp"),
        LinearGroup(name="down", linears=("mlp.down_proj",), prev_op="mlp.up_proj", inspect="mlp.down_proj"),
    )


def llama_block_roles(mlp_norm: str = "post_attention_layernorm") -> BlockRoles:
    return BlockRoles(
        attn_norm="input_layernorm",
        attn_in=QKV,
        attn_k="self_attn.k_proj",
        attn_v="self_attn.v_proj",
        attn_out=("self_attn.o_proj",),
        mlp_norm=mlp_norm,
        mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_out=("mlp.down_proj",),
        attn="self_attn",
        mlp="mlp",
    )


LLAMA_GROUPS = llama_groups()
LLAMA_ROLES = ModelRoles(embedding="model.embed_tokens", final_norm="model.norm", lm_head="lm_head")
LLAMA_BLOCK_ROLES = llama_block_roles()


def llama_like(name: str, model_types: tuple[str, ...], aliases: tuple[str, ...] = (), **overrides) -> ModelAdapter:
    fields = dict(
        name=name,
        model_types=model_types,
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        head=("model.norm", "lm_head"),
        groups=LLAMA_GROUPS,
        aliases=aliases,
        roles=LLAMA_ROLES,
        block_roles=LLAMA_BLOCK_ROLES,
    )
    fields.update(overrides)
    return ModelAdapter(**fields)


LLAMA = register_adapter(llama_like("Llama", ("llama",), aliases=("SmolLM", "SmolLM2")))
MISTRAL = register_adapter(llama_like("Mistral", ("mistral",)))
QWEN2 = register_adapter(llama_like("Qwen2", ("qwen2",)))
