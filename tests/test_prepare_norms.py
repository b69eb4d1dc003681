"""Gemma's `(1 + w)` norms rewritten as direct-weight norms: bit-identical forward in the model's
dtype, the checkpoint's own weights in `state_dict()` and after `restore`, and undo."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from llmc.models import get_adapter
from llmc.models.prepare_norms import DirectRMSNorm


def test_gemma_norms_prepare_and_restore_in_bfloat16():
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter("auto", "gemma2")
    adapter.prepare(model)
    norms = [m for m in model.modules() if isinstance(m, DirectRMSNorm)]
    assert len(norms) == 2 * 4 + 1  # four per block and the final norm
    assert not [m for m in model.modules() if type(m).__name__ == "Gemma2RMSNorm"]
    assert all(n.weight.dtype == torch.float32 for n in norms)  # 1 + w as Gemma computes it
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) and state[k].dtype == original[k].dtype for k in original)

    with adapter.checkpoint_layout(model, lambda m: m.weight):
        assert not [m for m in model.modules() if isinstance(m, DirectRMSNorm)]
        restored = model.state_dict()
        assert all(torch.equal(restored[k], original[k]) for k in original)
        assert type(model.model.norm).__name__ == "Gemma2RMSNorm"
    assert model.model.norm is norms[-1]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
