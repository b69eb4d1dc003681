"""Phi-1.5 / Phi-2: parallel attention, one `input_layernorm` feeding both the attention (q/k/v,
output `dense`, partial rotary) and the MLP (`fc1`, GELU, `fc2`); the residual is the block input,
so q/k/v and `fc1` are one group whose scale folds into that norm, inspected on the whole block
(`""`). `dense` reads the values of `v_proj` (exact fold); `fc2` reads a GELU output (none).
Final norm at `model.final_layernorm`; the LM head has a bias."""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.registry import register_adapter

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

PHI = register_adapter(
    ModelAdapter(
        name="Phi",
        model_types=("phi",),
        blocks="model.layers",
        pre_block=("model.embed_tokens", "model.rotary_emb"),
        head=("model.final_layernorm", "lm_head"),
        groups=(
            LinearGroup(name="qkv_fc1", linears=(*QKV, "mlp.fc1"), prev_op="input_layernorm", inspect=""),
            LinearGroup(name="dense", linears=("self_attn.dense",), prev_op="self_attn.v_proj",
                        inspect="self_attn.dense"),
            LinearGroup(name="fc2", linears=("mlp.fc2",), prev_op=None, inspect="mlp.fc2"),
        ),
        roles=ModelRoles(embedding="model.embed_tokens", final_norm="model.final_layernorm", lm_head="lm_head"),
        block_roles=BlockRoles(
            attn_norm="input_layernorm",
            attn_in=QKV,
            attn_v="self_attn.v_proj",
            attn_out=("self_attn.dense",),
            mlp_norm=None,
            mlp_in=("mlp.fc1",),
            mlp_out=("mlp.fc2",),
            attn="self_attn",
            mlp="mlp",
        ),
    )
)
