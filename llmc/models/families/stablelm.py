"""StableLM (2): the Llama layout with LayerNorms, partial rotary embedding and optional
per-head q/k LayerNorms (`qk_layernorm`, after q_proj/k_proj: no effect on folding). With
`use_parallel_residual` (StableLM-2-12B) the block has no `post_attention_layernorm` and
`input_layernorm` feeds both the attention and the MLP: q/k/v, gate and up are then one group
whose scale folds into it, inspected on the whole block (`""`). The layouts' groups are told
apart by that norm (`only_with` / `only_without`)."""

from llmc.models.adapter import LinearGroup
from llmc.models.families.llama import LLAMA_GROUPS, QKV, llama_like
from llmc.models.registry import register_adapter

GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
SEQUENTIAL = ("post_attention_layernorm",)

# The Llama block roles name post_attention_layernorm as the MLP norm; a parallel block lacks it.
STABLELM = register_adapter(llama_like(
    "StableLM",
    ("stablelm",),
    groups=(
        LinearGroup(name="qkv_gate_up", linears=(*QKV, *GATE_UP), prev_op="input_layernorm", inspect="",
                    only_without=SEQUENTIAL),
        LinearGroup(name="qkv", linears=QKV, prev_op="input_layernorm", inspect="self_attn", only_with=SEQUENTIAL),
        LLAMA_GROUPS[1],  # o after v
        LinearGroup(name="gate_up", linears=GATE_UP, prev_op="post_attention_layernorm", inspect="mlp",
                    only_with=SEQUENTIAL),
        LLAMA_GROUPS[3],  # down after up
    ),
))
