"""Tiny BLOOM, StarCoder (gpt_bigcode), StarCoder2, Falcon, Phi, Phi-3 and StableLM models, with
the alternate layouts one adapter must cover: StarCoder with full multi-head attention, Falcon's
sequential, new-architecture (two norms, grouped kv heads) and new-architecture one-norm layouts,
StableLM with a parallel residual and per-head q/k norms."""

from transformers import (
    BloomConfig,
    FalconConfig,
    GPTBigCodeConfig,
    Phi3Config,
    PhiConfig,
    StableLmConfig,
    Starcoder2Config,
)

from zoo import TinyModel

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, **TOKENS)
GQA = dict(SMALL, num_key_value_heads=2)
BIGCODE = dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=256, **TOKENS)
FALCON = dict(hidden_size=64, ffn_hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, **TOKENS)

ZOO = [
    TinyModel("bloom", "Bloom", lambda v: BloomConfig(vocab_size=v, hidden_size=64, n_layer=2, n_head=4, **TOKENS)),
    TinyModel("gpt_bigcode", "Starcoder", lambda v: GPTBigCodeConfig(vocab_size=v, multi_query=True, **BIGCODE)),
    TinyModel("gpt_bigcode-mha", "Starcoder", lambda v: GPTBigCodeConfig(vocab_size=v, multi_query=False, **BIGCODE)),
    TinyModel("starcoder2", "Starcoder2", lambda v: Starcoder2Config(vocab_size=v, **GQA)),
    # Falcon-7B: parallel attention, one norm, multi-query
    TinyModel("falcon", "Falcon", lambda v: FalconConfig(vocab_size=v, **FALCON)),
    # Falcon-RW: sequential, ALiBi, biases, full multi-head attention
    TinyModel("falcon-sequential", "Falcon", lambda v: FalconConfig(
        vocab_size=v, parallel_attn=False, multi_query=False, alibi=True, bias=True, **FALCON)),
    # Falcon-40B: new decoder architecture, ln_attn / ln_mlp, grouped kv heads
    TinyModel("falcon-new-arch", "Falcon", lambda v: FalconConfig(
        vocab_size=v, new_decoder_architecture=True, num_kv_heads=2, **FALCON)),
    # Falcon2-11B: new decoder architecture with one norm
    TinyModel("falcon-new-arch-1ln", "Falcon", lambda v: FalconConfig(
        vocab_size=v, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1, **FALCON)),
    TinyModel("phi", "Phi", lambda v: PhiConfig(vocab_size=v, **SMALL)),
    TinyModel("phi3", "Phi3", lambda v: Phi3Config(vocab_size=v, original_max_position_embeddings=256, **GQA)),
    TinyModel("stablelm", "StableLM", lambda v: StableLmConfig(vocab_size=v, **GQA)),
    TinyModel("stablelm-parallel", "StableLM", lambda v: StableLmConfig(
        vocab_size=v, use_parallel_residual=True, qk_layernorm=True, **GQA)),
]
