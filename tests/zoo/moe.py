"""Tiny mixture-of-experts models: Mixtral, Qwen2-MoE (shared expert and gate, one dense layer) and
Qwen3-MoE, each with 4 experts, top-2 routing and experts 32 wide (the group size divides every
quantized linear)."""

from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from zoo import TinyModel

MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=256, tie_word_embeddings=False, num_experts_per_tok=2)
QWEN = dict(MOE, intermediate_size=128, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True)

ZOO = [
    TinyModel("mixtral", "Mixtral", lambda v: MixtralConfig(
        vocab_size=v, intermediate_size=32, num_local_experts=4, **MOE)),
    TinyModel("qwen2_moe", "Qwen2MoE", lambda v: Qwen2MoeConfig(
        vocab_size=v, shared_expert_intermediate_size=64, mlp_only_layers=[1], **QWEN)),
    TinyModel("qwen3_moe", "Qwen3MoE", lambda v: Qwen3MoeConfig(vocab_size=v, head_dim=16, **QWEN)),
]
