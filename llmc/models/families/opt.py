"""OPT: pre-norm attention with a biased out_proj, a two-linear MLP (fc1/fc2), learned positions
and optional input/output projections around the decoder."""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.registry import register_adapter

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
        roles=ModelRoles(
            embedding="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm", lm_head="lm_head"
        ),
        block_roles=BlockRoles(
            attn_norm="self_attn_layer_norm",
            attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            attn_v="self_attn.v_proj",
            attn_out=("self_attn.out_proj",),
            mlp_norm="final_layer_norm",
            mlp_in=("fc1",),
            mlp_out=("fc2",),
            attn="self_attn",
            mlp=None,
        ),
    )
)
