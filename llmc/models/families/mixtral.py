"""Mixtral: the Llama attention, and a sparse MoE block `mlp` (the checkpoint's `block_sparse_moe`)
in place of the MLP: a float router `mlp.gate` (top-k of a softmax over `[E, H]` logits) and
experts fused by transformers into 3-D parameters. The `prepare` step splits them into per-expert
linears named as in the checkpoint, `mlp.experts.#.w1` (gate), `w3` (up) and `w2` (down), and
`restore` fuses them back for saving (llmc.models.moe, which also explains the groups)."""

from llmc.models.adapter import BlockRoles
from llmc.models.families.llama import LLAMA_BLOCK_ROLES, LLAMA_GROUPS, llama_like
from llmc.models.moe import fused_expert_steps, moe_groups
from llmc.models.registry import register_adapter

EXPERT = ("w1", "w3", "w2")
"""The checkpoint's per-expert names of gate, up and down."""

_prepare, _restore = fused_expert_steps(EXPERT)

MIXTRAL_BLOCK_ROLES = BlockRoles(
    **{k: getattr(LLAMA_BLOCK_ROLES, k)
       for k in ("attn_norm", "attn_in", "attn_v", "attn_out", "mlp_norm", "attn", "mlp")},
    mlp_in=("mlp.experts.#.w1", "mlp.experts.#.w3"),
    mlp_out=("mlp.experts.#.w2",),
    router=("mlp.gate",),
)

MIXTRAL = register_adapter(llama_like(
    "Mixtral", ("mixtral",), groups=LLAMA_GROUPS[:2] + moe_groups(EXPERT), block_roles=MIXTRAL_BLOCK_ROLES,
    float_linears=("mlp.gate",), prepare=_prepare, restore=_restore,
))
