"""StableLM (2): the Llama layout with LayerNorms, partial rotary embedding and optional
per-head q/k LayerNorms (`qk_layernorm`, after q_proj/k_proj: no effect on folding). With
`use_parallel_residual` (StableLM-2-12B) the block has no `post_attention_layernorm` and
`input_layernorm` feeds both the attention and the MLP: q/k/v, gate and up are then one group
whose scale folds into it, inspected on the whole block (`""`). The layouts' groups are told
apart by that norm (`only_with` / `only_without`)."""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.families.llama import O_GROUP, QKV
from llmc.models.registry import register_adapter

GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
SEQUENTIAL = ("post_attention_layernorm",)

STABLELM = register_adapter(
    ModelAdapter(
        name="StableLM",
        model_types=("stablelm",),
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        head=("model.norm", "lm_head"),
        groups=(
            LinearGroup(name="qkv_gate_up", linears=(*QKV, *GATE_UP), prev_op="input_layernorm", inspect="",
                        only_without=SEQUENTIAL),
            LinearGroup(name="qkv", linears=QKV, prev_op="input_layernorm", inspect="self_attn",
                        only_with=SEQUENTIAL),
            O_GROUP,
            LinearGroup(name="gate_up", linears=GATE_UP, prev_op="post_attention_layernorm", inspect="mlp",
                        only_with=SEQUENTIAL),
            LinearGroup(name="down", linears=("mlp.down_proj",), prev_op="mlp.up_proj", inspect="mlp.down_proj"),
        ),
        roles=ModelRoles(embedding="model.embed_tokens", final_norm="model.norm", lm_head="lm_head"),
        block_roles=BlockRoles(
            attn_norm="input_layernorm",
            attn_in=QKV,
            attn_v="self_attn.v_proj",
            attn_out=("self_attn.o_proj",),
            mlp_norm="post_attention_layernorm",
            mlp_in=GATE_UP,
            mlp_out=("mlp.down_proj",),
            attn="self_attn",
            mlp="mlp",
        ),
    )
)
