"""Tiny Llama-layout and OPT models."""

from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from zoo import TinyModel

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

ZOO = [
    TinyModel("llama", "Llama", lambda v: LlamaConfig(vocab_size=v, **SMALL)),
    TinyModel("mistral", "Mistral", lambda v: MistralConfig(vocab_size=v, sliding_window=16, **SMALL)),
    TinyModel("qwen2", "Qwen2", lambda v: Qwen2Config(vocab_size=v, **SMALL)),
    TinyModel("opt", "OPT", lambda v: OPTConfig(
        vocab_size=v, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
]
