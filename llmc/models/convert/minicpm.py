"""MiniCPM 1 / 2 (config `model_type: minicpm`, `MiniCPMForCausalLM`, remote code) as Llama.

MiniCPM has Llama's key names and blocks, plus three scalings from its config, each folded
into a weight so the result is plain Llama math (the published modeling_minicpm.py):

- `inputs_embeds = embed_tokens(ids) * scale_emb`          -> embed_tokens *= scale_emb
- `h = residual + branch(h) * (scale_depth / sqrt(L))`, for the attention and the MLP branch of
  every block                                               -> o_proj, down_proj (and o_proj's
  bias) *= scale_depth / sqrt(num_hidden_layers)
- `logits = lm_head(norm(h) / (hidden_size / dim_model_base))`, the division after the final
  norm                                                      -> lm_head *= dim_model_base / hidden_size

A head tied to the embedding is untied first (it keeps the unscaled embedding, times the head
factor), unless both factors are 1. Defaults for absent keys follow MiniCPM's config class
(scale_emb, scale_depth, dim_model_base = 1). MiniCPM-MoE (num_experts) and MiniCPM3 (model_type
minicpm3, multi-head latent attention) are not this layout.

The converted model is a `LlamaForCausalLM`; the folders llmc saves from it (save_trans,
save_fake, written by `save_pretrained`) are ordinary Llama checkpoints, loadable without remote code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmc.errors import ModelError
from llmc.models.convert import Converter, llama_config_kwargs, register_converter


def factors(source: dict) -> tuple[float, float, float]:
    """(embedding, residual-branch, head) multipliers of a MiniCPM config."""
    layers = int(source["num_hidden_layers"])
    hidden = int(source["hidden_size"])
    scale_emb = float(source.get("scale_emb", 1))
    branch = float(source.get("scale_depth", 1)) / math.sqrt(layers)
    head = float(source.get("dim_model_base", 1)) / hidden
    return scale_emb, branch, head


def _tied(source: dict, state: dict[str, Tensor]) -> bool:
    """Whether the checkpoint's head is its embedding (config.json, else: no lm_head tensor)."""
    tied = source.get("tie_word_embeddings")
    return bool(tied) if tied is not None else "lm_head.weight" not in state


def llama_config(source: dict) -> dict:
    if source.get("num_experts"):
        raise ModelError("MiniCPM-MoE (num_experts in config.json) is not supported; use a dense MiniCPM 1/2 checkpoint")
    scale_emb, _branch, head = factors(source)
    keep_tied = bool(source.get("tie_word_embeddings")) and scale_emb == 1 and head == 1
    return llama_config_kwargs(source, tie_word_embeddings=keep_tied)


def convert_state_dict(source: dict, state: dict[str, Tensor]) -> dict[str, Tensor]:
    scale_emb, branch, head = factors(source)
    out: dict[str, Tensor] = {}
    for key in list(state):
        tensor = state.pop(key)
        if key.endswith("rotary_emb.inv_freq"):
            continue
        out[key] = tensor
    embed = out.get("model.embed_tokens.weight")
    if _tied(source, out):
        if embed is None:
            return out  # reported by the caller as missing
        out["lm_head.weight"] = embed
    out["lm_head.weight"] = _scaled(out["lm_head.weight"], head)
    if embed is not None:
        out["model.embed_tokens.weight"] = _scaled(embed, scale_emb)
    for key, tensor in out.items():
        if key.endswith(("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight")):
            out[key] = _scaled(tensor, branch)
    return out


def _scaled(tensor: Tensor, factor: float) -> Tensor:
    """`tensor * factor`, computed in float32 (cast to the model's dtype on loading)."""
    return tensor.to(torch.float32) * factor


MINICPM = register_converter(
    Converter(
        name="MiniCPM",
        model_types=("minicpm",),
        llama_config=llama_config,
        state_dict=convert_state_dict,
        aliases=("MiniCPM2",),
        auto_configs=("configuration_minicpm.MiniCPMConfig",),
    )
)
