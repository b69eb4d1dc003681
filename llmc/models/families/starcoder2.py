"""StarCoder2: the Llama layout (q/k/v/o with grouped-query attention, rotary embedding at
`model.rotary_emb`) with LayerNorms (weight and bias) and a two-linear GELU MLP (`c_fc`, `c_proj`);
linears carry biases (`use_bias`). `mlp.c_proj` reads a GELU output: no exact producer."""

import dataclasses

from llmc.models.adapter import LinearGroup
from llmc.models.families.llama import LLAMA_BLOCK_ROLES, LLAMA_GROUPS, llama_like
from llmc.models.registry import register_adapter

STARCODER2 = register_adapter(llama_like(
    "Starcoder2",
    ("starcoder2",),
    groups=(
        *LLAMA_GROUPS[:2],  # q/k/v after input_layernorm, o after v
        LinearGroup(name="c_fc", linears=("mlp.c_fc",), prev_op="post_attention_layernorm", inspect="mlp"),
        LinearGroup(name="c_proj", linears=("mlp.c_proj",), prev_op=None, inspect="mlp.c_proj"),
    ),
    block_roles=dataclasses.replace(LLAMA_BLOCK_ROLES, mlp_in=("mlp.c_fc",), mlp_out=("mlp.c_proj",)),
))
