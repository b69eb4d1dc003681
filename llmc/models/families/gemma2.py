"""Gemma 2: "sandwich" norms, all computing `norm(x) * (1 + w)`. In each block `input_layernorm`
feeds q/k/v; `post_attention_layernorm` normalizes the attention OUTPUT (after o_proj) before the
residual add, so it feeds no linear; `pre_feedforward_layernorm` feeds gate/up; and
`post_feedforward_layernorm` normalizes the MLP's output. The `prepare` step rewrites those norms
(and the final norm) as plain `norm(x) * w'` modules so scales fold exactly; `restore` writes
`w = w' - 1` back for saving. Embeddings are scaled by sqrt(hidden) inside `embed_tokens`;
final logits are soft-capped (`final_logit_softcapping`). Sliding-window and full-attention
layers alternate: each block gets its own mask (captured per layer)."""

import dataclasses

from llmc.models.adapter import ModelAdapter
from llmc.models.families.llama import llama_block_roles, llama_groups, llama_like
from llmc.models.prepare_norms import offset_norm_steps
from llmc.models.registry import register_adapter

GEMMA_GROUPS = llama_groups(mlp_norm="pre_feedforward_layernorm")
GEMMA_BLOCK_ROLES = dataclasses.replace(llama_block_roles(mlp_norm="pre_feedforward_layernorm"),
                                        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))


def gemma_like(name: str, model_types: tuple[str, ...], norm_class: str) -> ModelAdapter:
    prepare, restore = offset_norm_steps((norm_class,), ("model.layers", "model.norm"))
    return llama_like(name, model_types, groups=GEMMA_GROUPS, block_roles=GEMMA_BLOCK_ROLES,
                      logit_softcap="final_logit_softcapping", prepare=prepare, restore=restore)


GEMMA2 = register_adapter(gemma_like("Gemma2", ("gemma2",), "Gemma2RMSNorm"))
