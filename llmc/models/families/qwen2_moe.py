"""Qwen2-MoE: the Qwen2 attention and, in each sparse layer, an MoE block `mlp`: a float router
`mlp.gate`, experts fused by transformers into 3-D parameters (split by the `prepare` step into
`mlp.experts.#.gate_proj`, `up_proj`, `down_proj`, the checkpoint's names, and fused back by
`restore`; see llmc.models.moe, which also explains the groups), and a shared expert
`mlp.shared_expert` (an MLP every token runs through) whose output is scaled by
`sigmoid(mlp.shared_expert_gate(x))`, a `[1, H]` linear kept in float like the router. Layers
listed in `mlp_only_layers`, or off the `decoder_sparse_step`, have a dense MLP (`mlp.gate_proj`,
`up_proj`, `down_proj`) instead. `qwen_moe` also declares Qwen3-MoE (no shared expert)."""

from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter
from llmc.models.families.llama import LLAMA_BLOCK_ROLES, LLAMA_GROUPS, llama_like
from llmc.models.moe import fused_expert_steps, moe_groups
from llmc.models.registry import register_adapter

EXPERT = ("gate_proj", "up_proj", "down_proj")

DENSE_GROUPS = (
    LinearGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), prev_op="post_attention_layernorm", inspect="mlp",
                only_without=("mlp.experts",)),
    LinearGroup("down", ("mlp.down_proj",), prev_op="mlp.up_proj", inspect="mlp.down_proj",
                only_without=("mlp.experts",)),
)
"""The dense MLP of the layers without experts (a model may have none)."""

_ATTN_ROLES = {k: getattr(LLAMA_BLOCK_ROLES, k)
               for k in ("attn_norm", "attn_in", "attn_v", "attn_out", "mlp_norm", "attn", "mlp")}


def qwen_moe(name: str, model_type: str, shared: bool, aliases: tuple[str, ...] = ()) -> ModelAdapter:
    """A Qwen MoE adapter, with or without the shared expert."""
    shared_expert, shared_gate = ("mlp.shared_expert", "mlp.shared_expert_gate") if shared else (None, None)
    shared_in = (f"{shared_expert}.gate_proj", f"{shared_expert}.up_proj") if shared else ()
    shared_out = (f"{shared_expert}.down_proj",) if shared else ()
    routers = ("mlp.gate", shared_gate) if shared else ("mlp.gate",)
    roles = BlockRoles(
        **_ATTN_ROLES,
        mlp_in=("mlp.gate_proj", "mlp.up_proj", *shared_in, "mlp.experts.#.gate_proj", "mlp.experts.#.up_proj"),
        mlp_out=("mlp.down_proj", *shared_out, "mlp.experts.#.down_proj"),
        router=routers,
    )
    prepare, restore = fused_expert_steps(EXPERT)
    groups = LLAMA_GROUPS[:2] + DENSE_GROUPS + moe_groups(EXPERT, shared=shared_expert, shared_gate=shared_gate)
    return llama_like(name, (model_type,), aliases=aliases, groups=groups, block_roles=roles, float_linears=routers,
                      prepare=prepare, restore=restore)


QWEN2_MOE = register_adapter(qwen_moe("Qwen2MoE", "qwen2_moe", shared=True, aliases=("Qwen2_MoE",)))
