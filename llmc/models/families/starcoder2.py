"""StarCoder2: the Llama layout (q/k/v/o with grouped-query attention, rotary embedding at
`model.rotary_emb`) with LayerNorms (weight and bias) and a two-linear GELU MLP (`c_fc`, `c_proj`);
linears carry biases (`use_bias`). `mlp.c_proj` reads a GELU output: no exact producer."""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.families.llama import O_GROUP, QKV
from llmc.models.registry import register_adapter

STARCODER2 = register_adapter(
    ModelAdapter(
        name="Starcoder2",
        model_types=("starcoder2",),
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        head=("model.norm", "lm_head"),
        groups=(
            LinearGroup(name="qkv", linears=QKV, prev_op="input_layernorm", inspect="self_attn"),
            O_GROUP,
            LinearGroup(name="c_fc", linears=("mlp.c_fc",), prev_op="post_attention_layernorm", inspect="mlp"),
            LinearGroup(name="c_proj", linears=("mlp.c_proj",), prev_op=None, inspect="mlp.c_proj"),
        ),
        roles=ModelRoles(embedding="model.embed_tokens", final_norm="model.norm", lm_head="lm_head"),
        block_roles=BlockRoles(
            attn_norm="input_layernorm",
            attn_in=QKV,
            attn_v="self_attn.v_proj",
            attn_out=("self_attn.o_proj",),
            mlp_norm="post_attention_layernorm",
            mlp_in=("mlp.c_fc",),
            mlp_out=("mlp.c_proj",),
            attn="self_attn",
            mlp="mlp",
        ),
    )
)
