"""save_trans / save_fake folders load with transformers and give the in-memory model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from llmc import compress
from llmc.quant import fake_quant_modules, quant_disabled
from llmc.save import FAKE_DIR, TRANS_DIR


def _run(model_dir, out, **quant):
    cfg = tiny_config(
        model_dir,
        quant={"method": "RTN", "weight": {"bit": 3, "granularity": "per_group", "group_size": 32, **quant}},
        save={"save_trans": True, "save_fake": True, "save_path": str(out)},
    )
    return compress(cfg, progress=False)


@pytest.mark.parametrize("calib_algo", ["minmax", "mse"])
def test_saved_models_match_in_memory(tiny_model_dir, tmp_path, calib_algo):
    out = tmp_path / "out"
    result = _run(tiny_model_dir, out, calib_algo=calib_algo)
    assert fake_quant_modules(result.model)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake_logits = result.model(ids).logits
        with quant_disabled(result.model):
            trans_logits = result.model(ids).logits
    for folder, expected in ((FAKE_DIR, fake_logits), (TRANS_DIR, trans_logits)):
        loaded = AutoModelForCausalLM.from_pretrained(out / folder, dtype=torch.float32).eval()
        assert not any("w_scale" in k for k in loaded.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert list((out / folder).glob("*.safetensors")) and not list((out / folder).glob("*.bin"))
        assert (out / folder / "tokenizer.json").exists()
    assert not torch.allclose(fake_logits, trans_logits)
    results = json.loads((out / "results.json").read_text())
    positions = [r["position"] for r in results["perplexity"]]
    assert positions == ["pretrain", "fake_quant"]
    assert results["perplexity"][1]["ppl"] != results["perplexity"][0]["ppl"]  # random weights: either way
    assert results["protocol"] and results["seed"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_failure_leaves_no_output(tiny_llama_dir, tmp_path, monkeypatch):
    import llmc.runner as runner

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(runner, "save_hf_model", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(tiny_llama_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
