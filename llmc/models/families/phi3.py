"""Phi-3: the Llama layout with a fused `self_attn.qkv_proj` (q, k, v rows) and a fused
`mlp.gate_up_proj` (gate rows, then up rows), RMSNorms. Each fused linear is one quantization
target. Scales fold into the two norms only: `o_proj` reads values produced among q and k rows
and `down_proj` reads up rows of a producer twice its width, neither a 1:1 producer."""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.registry import register_adapter

PHI3 = register_adapter(
    ModelAdapter(
        name="Phi3",
        model_types=("phi3",),
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        head=("model.norm", "lm_head"),
        groups=(
            LinearGroup(name="qkv", linears=("self_attn.qkv_proj",), prev_op="input_layernorm", inspect="self_attn"),
            LinearGroup(name="o", linears=("self_attn.o_proj",), prev_op=None, inspect="self_attn.o_proj"),
            LinearGroup(name="gate_up", linears=("mlp.gate_up_proj",), prev_op="post_attention_layernorm",
                        inspect="mlp"),
            LinearGroup(name="down", linears=("mlp.down_proj",), prev_op=None, inspect="mlp.down_proj"),
        ),
        roles=ModelRoles(embedding="model.embed_tokens", final_norm="model.norm", lm_head="lm_head"),
        block_roles=BlockRoles(
            attn_norm="input_layernorm",
            attn_in=("self_attn.qkv_proj",),
            attn_v="self_attn.qkv_proj",
            attn_out=("self_attn.o_proj",),
            mlp_norm="post_attention_layernorm",
            mlp_in=("mlp.gate_up_proj",),
            mlp_out=("mlp.down_proj",),
            attn="self_attn",
            mlp="mlp",
        ),
    )
)
