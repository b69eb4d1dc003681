"""BLOOM: ALiBi positions (no position module), a LayerNorm right after the word embeddings
(`word_embeddings_layernorm`, run before the first block), a fused `query_key_value` (q, k, v
interleaved per head) and a GELU MLP. The decoder loop reads `outputs[0]` of each block.

Scales fold into the two LayerNorms only: the attention's `dense` reads values that the fused
qkv produces among q and k rows, and `dense_4h_to_h` reads a GELU output, so neither has an exact
producer. Folding into `input_layernorm` assumes `apply_residual_connection_post_layernorm` is
false (as in every released BLOOM), where the residual is the block input, not the norm output.
"""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.registry import register_adapter

BLOOM = register_adapter(
    ModelAdapter(
        name="Bloom",
        model_types=("bloom",),
        blocks="transformer.h",
        pre_block=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
        head=("transformer.ln_f", "lm_head"),
        groups=(
            LinearGroup(name="qkv", linears=("self_attention.query_key_value",), prev_op="input_layernorm",
                        inspect="self_attention"),
            LinearGroup(name="dense", linears=("self_attention.dense",), prev_op=None,
                        inspect="self_attention.dense"),
            LinearGroup(name="h_to_4h", linears=("mlp.dense_h_to_4h",), prev_op="post_attention_layernorm",
                        inspect="mlp"),
            LinearGroup(name="4h_to_h", linears=("mlp.dense_4h_to_h",), prev_op=None, inspect="mlp.dense_4h_to_h"),
        ),
        head_dim="self_attention.head_dim",
        roles=ModelRoles(embedding="transformer.word_embeddings", final_norm="transformer.ln_f", lm_head="lm_head"),
        block_roles=BlockRoles(
            attn_norm="input_layernorm",
            attn_in=("self_attention.query_key_value",),
            attn_v="self_attention.query_key_value",
            attn_out=("self_attention.dense",),
            mlp_norm="post_attention_layernorm",
            mlp_in=("mlp.dense_h_to_4h",),
            mlp_out=("mlp.dense_4h_to_h",),
            attn="self_attention",
            mlp="mlp",
        ),
        block_returns_tuple=True,
    )
)
