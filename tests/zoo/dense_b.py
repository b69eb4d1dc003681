"""Tiny Qwen3, Gemma 2/3, SmolLM3, InternLM3, MiniCPM3 and LLaVA models.

Sliding windows (8) are shorter than the test sequences (24-32 tokens), so sliding-window and
full-attention layers really get different masks. Gemma's `(1 + w)` norms get random weights
(zero at init), so a lost `+ 1` / `- 1` around the prepare/restore steps shows in the logits.
"""

import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    Gemma2Config,
    Gemma3TextConfig,
    InternLM3Config,
    LlamaConfig,
    LlavaConfig,
    MiniCPM3Config,
    Qwen3Config,
    SmolLM3Config,
)

from zoo import TinyModel

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
THREE = dict(SMALL, num_hidden_layers=3)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA = dict(THREE, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=30.0,
             tie_word_embeddings=True, **TOKENS)


def with_random_norms(config) -> torch.nn.Module:
    """The model with its 1-D norm weights random (Gemma's init makes every `1 + w` exactly 1)."""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(0, 0.2)
    return model


def llava(vocab: int) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=vocab, **SMALL, **TOKENS)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1, image_seq_length=4,
                       tie_word_embeddings=False)


ZOO = [
    TinyModel("qwen3", "Qwen3", lambda v: Qwen3Config(vocab_size=v, head_dim=16, **SMALL)),
    TinyModel("gemma2", "Gemma2", lambda v: Gemma2Config(vocab_size=v, attn_logit_softcapping=50.0, **GEMMA),
              build=with_random_norms),
    TinyModel("gemma3_text", "Gemma3", lambda v: Gemma3TextConfig(
        vocab_size=v, layer_types=["sliding_attention", "full_attention", "sliding_attention"], **GEMMA),
        build=with_random_norms),
    TinyModel("smollm3", "SmolLM3", lambda v: SmolLM3Config(
        vocab_size=v, no_rope_layers=[1, 1, 0], use_sliding_window=True, sliding_window=8, **THREE, **TOKENS)),
    TinyModel("internlm3", "InternLM3", lambda v: InternLM3Config(vocab_size=v, **SMALL, **TOKENS)),
    TinyModel("minicpm3", "MiniCPM3", lambda v: MiniCPM3Config(
        vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, scale_emb=12, scale_depth=1.4, dim_model_base=32, max_position_embeddings=256,
        **TOKENS)),
    TinyModel("llava", "Llava", llava, auto_class="AutoModelForImageTextToText"),
]
