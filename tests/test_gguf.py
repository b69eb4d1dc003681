"""Families transformers reads from GGUF load from GGUF through llmc too: a tiny random model is
written as an F32 GGUF file (llama.cpp's tensor names and layouts, via the `gguf` package) and
`load_model(gguf_file=...)` must give the source model's logits, with the family's adapter.

transformers' GGUF reader knows llama, mistral, qwen2, qwen3, gemma2 and gemma3 (text) among the
dense families; not smollm3, minicpm3 or llava (InternLM3 is written by llama.cpp as `llama`).
Its qwen3 mapping ignores `attention.key_length`, so a Qwen3 GGUF loads with Qwen3Config's
default head_dim (128, as in every released Qwen3): the tiny Qwen3 uses that head size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

from llmc.config.schema import ModelSection
from llmc.models import load_model
from llmc.models.coverage import uncovered

gguf = pytest.importorskip("gguf")

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False)
CASES = {
    "llama": ("Llama", lambda v: LlamaConfig(vocab_size=v, **BASE)),
    "qwen2": ("Qwen2", lambda v: Qwen2Config(vocab_size=v, **BASE)),
    "qwen3": ("Qwen3", lambda v: Qwen3Config(vocab_size=v, head_dim=128, **BASE)),
    "gemma2": ("Gemma2", lambda v: Gemma2Config(vocab_size=v, **dict(BASE, head_dim=16, sliding_window=8,
                                                                       tie_word_embeddings=True))),
    "gemma3_text": ("Gemma3", lambda v: Gemma3TextConfig(vocab_size=v, **dict(BASE, head_dim=16, sliding_window=8,
                                                                                 tie_word_embeddings=True))),
}
GGUF_ARCH = {"gemma3_text": "gemma3"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for the llama architecture (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: torch.nn.Module, path) -> None:
    """The model as llama.cpp's converter writes it, in F32 (no tokenizer: loaded from a folder)."""
    cfg = model.config
    arch = GGUF_ARCH.get(cfg.model_type, cfg.model_type)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    for name, tensor in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        target = names.get_name(base)
        if target is None or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        data = tensor.detach().float().numpy().copy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads
            data = _permute(data, heads)
        elif arch.startswith("gemma") and "norm" in base:
            data = data + 1.0  # llama.cpp stores Gemma's `(1 + w)` norm weights as 1 + w
        writer.add_tensor(f"{target}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("model_type", list(CASES))
def test_gguf_file_loads_with_the_source_logits(model_type, tmp_path, tiny_tokenizer):
    adapter_name, config = CASES[model_type]
    torch.manual_seed(0)
    source = transformers.AutoModelForCausalLM.from_config(config(len(tiny_tokenizer)), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in source.parameters():  # norms random too (Gemma's init makes every `1 + w` exactly 1)
            p.normal_(0, 0.08) if p.dim() >= 2 else p.normal_(0 if "gemma" in model_type else 1, 0.2)
    folder, tokenizer_folder = tmp_path / "gguf", tmp_path / "tokenizer"
    folder.mkdir()
    write_gguf(source, folder / "tiny.gguf")
    tiny_tokenizer.save_pretrained(tokenizer_folder)
    loaded = load_model(ModelSection(type="auto", path=str(folder), gguf_file="tiny.gguf",
                                     tokenizer_path=str(tokenizer_folder), torch_dtype="float32"))
    assert loaded.adapter.name == adapter_name
    assert all(uncovered(loaded.adapter, b) == [] for b in loaded.adapter.get_blocks(loaded.model))
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(loaded.model(input_ids=ids, use_cache=False).logits, expected,
                                   rtol=1e-5, atol=1e-5)
