"""save_trans / save_fake folders load with transformers and give the in-memory model's logits."""

from __future__ import annotations

import contextlib
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
    # nothing at save_path nor a temporary folder; only the resume checkpoint (kept for a rerun) may stay
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".llmc-resume")] == []


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_llava_folders_load_with_their_processor(tmp_path):
    """A multi-modal source folder's processor (image processor, chat template) is copied to the
    saved folders, which run an image and text through the processor and the reloaded model."""
    import numpy as np
    from conftest import build_tokenizer
    from PIL import Image
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        CLIPImageProcessor,
        CompressedTensorsConfig,
        LlavaProcessor,
    )
    from zoo.dense_b import llava

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(llava(len(tokenizer)), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template="{{ messages[0].content }}")
    source, out = tmp_path / "source", tmp_path / "out"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    cfg = tiny_config(source, quant={"method": "RTN", "weight": {"bit": 4, "granularity": "per_group", "group_size": 32}},
                      save={"save_trans": True, "save_fake": True, "save_vllm": True, "save_path": str(out)})
    del cfg["eval"]
    result = compress(cfg, progress=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    for folder, quantized in ((FAKE_DIR, True), (TRANS_DIR, False), ("vllm_quant_model", True)):
        loaded_processor = AutoProcessor.from_pretrained(out / folder)
        assert loaded_processor.chat_template == processor.chat_template
        inputs = loaded_processor(images=image, text="<image> the cat sat", return_tensors="pt")
        assert int((inputs["input_ids"] == len(tokenizer) - 1).sum()) == 4
        extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "vllm" in folder else {}
        loaded = AutoModelForImageTextToText.from_pretrained(out / folder, dtype=torch.float32, **extra).eval()
        with torch.no_grad(), contextlib.nullcontext() if quantized else quant_disabled(result.model):
            expected = result.model(**inputs).logits
            torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
