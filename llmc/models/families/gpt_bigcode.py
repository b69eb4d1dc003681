"""StarCoder (`gpt_bigcode`): GPT-2 layout (`transformer.h`, learned positions `wpe`, `ln_1`/`ln_2`)
with a fused `attn.c_attn`: under multi-query attention its rows are q (all heads), then one
k and one v head; otherwise q, k, v interleaved per head. The LM head is tied to `wte`.

Scales fold into `ln_1` and `ln_2` only: `attn.c_proj` reads values produced among q and k rows
of the fused `c_attn`, and `mlp.c_proj` reads a GELU output, so neither has an exact producer.
"""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.registry import register_adapter

STARCODER = register_adapter(
    ModelAdapter(
        name="Starcoder",
        model_types=("gpt_bigcode",),
        blocks="transformer.h",
        pre_block=("transformer.wte", "transformer.wpe"),
        head=("transformer.ln_f", "lm_head"),
        groups=(
            LinearGroup(name="c_attn", linears=("attn.c_attn",), prev_op="ln_1", inspect="attn"),
            LinearGroup(name="attn_c_proj", linears=("attn.c_proj",), prev_op=None, inspect="attn.c_proj"),
            LinearGroup(name="c_fc", linears=("mlp.c_fc",), prev_op="ln_2", inspect="mlp"),
            LinearGroup(name="mlp_c_proj", linears=("mlp.c_proj",), prev_op=None, inspect="mlp.c_proj"),
        ),
        head_dim="attn.head_dim",
        roles=ModelRoles(embedding="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head"),
        block_roles=BlockRoles(
            attn_norm="ln_1",
            attn_in=("attn.c_attn",),
            attn_v="attn.c_attn",
            attn_out=("attn.c_proj",),
            mlp_norm="ln_2",
            mlp_in=("mlp.c_fc",),
            mlp_out=("mlp.c_proj",),
            attn="attn",
            mlp="mlp",
        ),
    )
)
