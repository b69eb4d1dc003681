"""MiniCPM3: multi-head latent attention. The block's input norm feeds the two down-projections
(`q_a_proj`, `kv_a_proj_with_mqa`); `q_a_layernorm` feeds `q_b_proj` and `kv_a_layernorm` (on the
latent part of kv_a's output) feeds `kv_b_proj`, both exact fold targets. o_proj reads the values,
which come out of kv_b_proj interleaved with the keys' no-rope part, so no op takes its scale
(prev_op None). Embeddings are scaled (`scale_emb`, inside `embed_tokens`) and residual branches
(`scale_depth`, inside each block); hidden states are divided by `config.logits_scaling` before
the LM head. Only the `q_lora_rank` variant (every released MiniCPM3) is declared."""

import dataclasses

from llmc.models.adapter import LinearGroup
from llmc.models.families.llama import LLAMA_BLOCK_ROLES, LLAMA_GROUPS, llama_like
from llmc.models.registry import register_adapter

MINICPM3 = register_adapter(llama_like(
    "MiniCPM3",
    ("minicpm3",),
    groups=(
        LinearGroup(
            name="qkv_a",
            linears=("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
            prev_op="input_layernorm",
            inspect="self_attn",
        ),
        LinearGroup(name="q_b", linears=("self_attn.q_b_proj",), prev_op="self_attn.q_a_layernorm",
                    inspect="self_attn.q_b_proj"),
        LinearGroup(name="kv_b", linears=("self_attn.kv_b_proj",), prev_op="self_attn.kv_a_layernorm",
                    inspect="self_attn.kv_b_proj"),
        LinearGroup(name="o", linears=("self_attn.o_proj",), prev_op=None, inspect="self_attn.o_proj"),
        *LLAMA_GROUPS[2:],  # gate/up after post_attention_layernorm, down after up
    ),
    block_roles=dataclasses.replace(
        LLAMA_BLOCK_ROLES, attn_in=("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        attn_v="self_attn.kv_b_proj",
    ),
    head_dim="self_attn.v_head_dim",
    lm_head_divisor="logits_scaling",
))
