"""Falcon: a fused `self_attention.query_key_value` (multi-query, grouped or full heads), rotary
or ALiBi positions, a GELU MLP, and a decoder loop that reads `outputs[0]` of each block. The
linears are the same in every layout; the norms tell the layouts apart, so each layout's groups
are declared with the norms that mark it (`only_with` / `only_without`):

- sequential (`parallel_attn: false`, Falcon-RW): `input_layernorm` before the attention,
  `post_attention_layernorm` before the MLP;
- parallel with one norm (Falcon-7B; new decoder architecture with `num_ln_in_parallel_attn: 1`,
  Falcon2-11B): `input_layernorm` feeds both the attention and the MLP, so qkv and `dense_h_to_4h`
  are one group whose scale folds into it, inspected on the whole block;
- parallel with two norms (new decoder architecture, Falcon-40B/180B): `ln_attn` and `ln_mlp`.

Under parallel attention the block adds the attention output into the MLP's output tensor in
place, so what the MLP and `dense_4h_to_h` returned is overwritten: the MLP-side groups are
inspected on the whole block (`""`), whose output is a fresh tensor. `dense` and `dense_4h_to_h`
have no exact producer (values come out of the fused qkv among q and k rows; GELU).
The block roles name the sequential / one-norm norms (`mlp_norm` absent: parallel attention).
"""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.registry import register_adapter

QKV = "self_attention.query_key_value"
H_TO_4H = "mlp.dense_h_to_4h"

FALCON = register_adapter(
    ModelAdapter(
        name="Falcon",
        model_types=("falcon",),
        blocks="transformer.h",
        pre_block=("transformer.word_embeddings", "transformer.rotary_emb"),
        head=("transformer.ln_f", "lm_head"),
        groups=(
            # parallel attention, one norm
            LinearGroup(name="qkv_h_to_4h", linears=(QKV, H_TO_4H), prev_op="input_layernorm", inspect="",
                        only_with=("input_layernorm",), only_without=("post_attention_layernorm",)),
            # sequential
            LinearGroup(name="qkv", linears=(QKV,), prev_op="input_layernorm", inspect="self_attention",
                        only_with=("post_attention_layernorm",)),
            # parallel attention, two norms
            LinearGroup(name="qkv_ln_attn", linears=(QKV,), prev_op="ln_attn", inspect="self_attention",
                        only_with=("ln_attn",)),
            LinearGroup(name="dense", linears=("self_attention.dense",), prev_op=None, inspect="self_attention.dense"),
            LinearGroup(name="h_to_4h", linears=(H_TO_4H,), prev_op="post_attention_layernorm", inspect="mlp",
                        only_with=("post_attention_layernorm",)),
            LinearGroup(name="h_to_4h_ln_mlp", linears=(H_TO_4H,), prev_op="ln_mlp", inspect="",
                        only_with=("ln_mlp",)),
            LinearGroup(name="4h_to_h", linears=("mlp.dense_4h_to_h",), prev_op=None, inspect=""),
        ),
        head_dim="self_attention.head_dim",
        roles=ModelRoles(embedding="transformer.word_embeddings", final_norm="transformer.ln_f", lm_head="lm_head"),
        block_roles=BlockRoles(
            attn_norm="input_layernorm",
            attn_in=(QKV,),
            attn_v=QKV,
            attn_out=("self_attention.dense",),
            mlp_norm="post_attention_layernorm",
            mlp_in=(H_TO_4H,),
            mlp_out=("mlp.dense_4h_to_h",),
            attn="self_attention",
            mlp="mlp",
        ),
        block_returns_tuple=True,
    )
)
