"""InternLM2 / InternLM2.5 (config `model_type: internlm2`, `InternLM2ForCausalLM`, remote code) as Llama.

InternLM2 is Llama's math under other names, except that q, k and v come from one fused linear
`attention.wqkv`, whose output rows are grouped per key/value head: for each of the
`num_key_value_heads` groups, the `num_attention_heads / num_key_value_heads` query heads of the
group, then the group's key head, then its value head, `head_dim` rows each (the published
modeling_internlm2.py: `rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + groups, d=head_dim)`,
q = `[..., :groups, :]`, k = `[..., -2, :]`, v = `[..., -1, :]`). Query head `g` of group `h` is
query head `h * groups + g`, which Llama's grouped-query attention pairs with key/value head `h`,
so the split rows keep their meaning exactly.

Renames: tok_embeddings -> embed_tokens, attention_norm -> input_layernorm, attention.wo -> o_proj,
ffn_norm -> post_attention_layernorm, feed_forward.w1/w3/w2 -> mlp.gate/up/down_proj,
output -> lm_head. Config `bias` (on wqkv and wo) is Llama's `attention_bias`; rope_theta,
rope_scaling (linear/dynamic), rms_norm_eps and tie_word_embeddings carry over.

The converted model is a `LlamaForCausalLM`; the folders llmc saves from it (save_trans,
save_fake, written by `save_pretrained`) are ordinary Llama checkpoints, loadable without remote code.
"""

from __future__ import annotations

import re

from torch import Tensor

from llmc.errors import ModelError
from llmc.models.convert import Converter, llama_config_kwargs, register_converter

LAYER_MODULES = {
    "attention_norm": "input_layernorm",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
TOP_LEVEL = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def llama_config(source: dict) -> dict:
    return llama_config_kwargs(source, attention_bias=bool(source.get("bias", False)))


def _heads(source: dict) -> tuple[int, int, int]:
    heads = int(source["num_attention_heads"])
    kv_heads = int(source.get("num_key_value_heads") or heads)
    return heads, kv_heads, int(source["hidden_size"]) // heads


def split_wqkv(tensor: Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """InternLM2's fused, per-group wqkv weight (or bias) -> Llama's q, k and v."""
    groups = heads // kv_heads
    rows = kv_heads * (groups + 2) * head_dim
    if tensor.shape[0] != rows:
        raise ModelError(
            f"InternLM2 attention.wqkv has {tensor.shape[0]} output rows, its config says {rows} "
            f"({kv_heads} kv heads x ({groups} q + k + v) x head_dim {head_dim}); check config.json"
        )
    rest = tuple(tensor.shape[1:])
    grouped = tensor.reshape(kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(heads * head_dim, *rest).clone()
    k = grouped[:, -2].reshape(kv_heads * head_dim, *rest).clone()
    v = grouped[:, -1].reshape(kv_heads * head_dim, *rest).clone()
    return q, k, v


def convert_state_dict(source: dict, state: dict[str, Tensor]) -> dict[str, Tensor]:
    heads, kv_heads, head_dim = _heads(source)
    out: dict[str, Tensor] = {}
    for key in list(state):
        tensor = state.pop(key)
        if key.endswith("rotary_emb.inv_freq"):  # a buffer some .bin checkpoints carry
            continue
        if key in TOP_LEVEL:
            out[TOP_LEVEL[key]] = tensor
            continue
        match = LAYER_KEY.fullmatch(key)
        if match is None:
            out[key] = tensor  # reported by the caller as unexpected
            continue
        index, module, param = match.groups()
        prefix = f"model.layers.{index}."
        if module == "attention.wqkv":
            q, k, v = split_wqkv(tensor, heads, kv_heads, head_dim)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{prefix}self_attn.{name}.{param}"] = part
        else:
            out[f"{prefix}{LAYER_MODULES.get(module, module)}.{param}"] = tensor
    if source.get("tie_word_embeddings") and "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


INTERNLM2 = register_converter(
    Converter(
        name="InternLM2",
        model_types=("internlm2",),
        llama_config=llama_config,
        state_dict=convert_state_dict,
        aliases=("InternLM2.5",),
        auto_configs=("configuration_internlm2.InternLM2Config",),
    )
)
