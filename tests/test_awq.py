"""AWQ: its scales leave the float model's function unchanged (tiny GQA Llama, OPT, real SmolLM2),
quantized it beats RTN on the same weight config, it runs in the pipeline alone and composed,
and its `quant.special` keys are validated."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from llmc import compress
from llmc.config import load_config
from llmc.data import build_calibration, load_named_documents
from llmc.errors import ConfigError
from llmc.methods import METHODS, get_methods, method_class
from llmc.models import get_adapter
from llmc.pipeline import BlockwisePipeline, capture_block_inputs
from llmc.quant import FakeQuantLinear
from llmc.schedule import block_targets

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(special: dict | None = None, bit: int = 4, group_size: int = 32, method="AWQ"):
    quant = {"method": method, "weight": {"bit": bit, "group_size": group_size, "partial_group": True}}
    if special is not None:
        quant["special"] = special
    return load_config({"model": {"path": "unused"}, "quant": quant})


def _apply(model, adapter, cfg, batches, final: bool) -> None:
    method = method_class(cfg.quant.methods[0])(cfg.quant, final=final)
    inputs = capture_block_inputs(model, adapter, batches, CPU)
    BlockwisePipeline(model, adapter, CPU, progress=False).run(
        inputs, method.process_block, targets=lambda i: block_targets(cfg.quant.ignored_layers, adapter, adapter.get_blocks(model)[i], i)
    )


def _random_batches(vocab: int, seed: int = 0) -> tuple[list[dict], torch.Tensor]:
    """Two calibration batches, the second right-padded (masks reach the statistics), and held-out ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (5, 48), generator=gen)
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, 30:] = 0
    return [
        {"input_ids": ids[:2], "attention_mask": None},
        {"input_ids": ids[2:4], "attention_mask": mask},
    ], ids[4:]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _tiny(kind: str):
    model = build_tiny_model(kind, 384)
    return model, get_adapter("auto", model.config.model_type)


@pytest.mark.parametrize("trans_version", ["v1", "v2"])
@pytest.mark.parametrize("kind", ["llama", "opt"])
@torch.no_grad()
def test_scaling_preserves_logits(kind, trans_version):
    model, adapter = _tiny(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, held = _random_batches(model.config.vocab_size)
    expected = model(held).logits
    _apply(
        model, adapter, _config({"weight_clip": False, "trans_version": trans_version}, bit=3), batches, False
    )
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert _rel_err(model(held).logits, expected) < 1e-4
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    o_proj = adapter.groups[1].linears[0]  # v_proj -> o_proj (grouped-query on the tiny Llama)
    assert any(k.endswith(f"{o_proj}.weight") for k in changed), sorted(changed)


@torch.no_grad()
def test_gqa_group_without_head_dim_is_left_unscaled():
    """A v_proj producer narrower than o_proj's input needs head_dim; without it the group is skipped."""
    model, adapter = _tiny("llama")
    adapter = dataclasses.replace(adapter, head_dim="self_attn.no_such_attribute")
    o_before = [b.self_attn.o_proj.weight.clone() for b in adapter.get_blocks(model)]
    batches, held = _random_batches(model.config.vocab_size)
    expected = model(held).logits
    _apply(model, adapter, _config({"weight_clip": False, "trans_version": "v1"}, bit=3), batches, False)
    assert _rel_err(model(held).logits, expected) < 1e-4
    for block, w in zip(adapter.get_blocks(model), o_before):
        assert torch.equal(block.self_attn.o_proj.weight, w)
    assert not torch.equal(adapter.get_blocks(model)[0].post_attention_layernorm.weight, torch.ones(64))


@pytest.mark.real_model
@torch.no_grad()
def test_scaling_preserves_logits_real_model(real_loaded):
    loaded = real_loaded  # a private copy of the GGUF-loaded model (tests/conftest.py)
    model, adapter = loaded.model, loaded.adapter
    docs = load_named_documents("c4", "calib")[:50]
    batches = build_calibration(docs, loaded.tokenizer, 2, 64, 1, "general", 0)
    held = build_calibration(docs, loaded.tokenizer, 1, 32, 1, "general", 1)[0]["input_ids"]
    expected = model(held).logits
    norm = adapter.get_blocks(model)[0].input_layernorm.weight.clone()
    _apply(model, adapter, _config({"weight_clip": False, "n_grid": 3}, group_size=128), batches, False)
    assert _rel_err(model(held).logits, expected) < 1e-4
    assert not torch.equal(adapter.get_blocks(model)[0].input_layernorm.weight, norm)


def _calibration_text_batches(tokenizer) -> list[dict]:
    return build_calibration(load_named_documents("wikitext2", "calib"), tokenizer, 8, 64, 4, "general", 0)


@pytest.mark.parametrize("kind", ["llama", "opt"])
@torch.no_grad()
def test_awq_beats_rtn_at_w3_g32(kind, tiny_tokenizer):
    """Output error of the whole model on the calibration data, W3 g32 asymmetric, AWQ vs RTN."""
    batches = _calibration_text_batches(tiny_tokenizer)
    ids = torch.cat([b["input_ids"] for b in batches])
    errors = {}
    for name, special in [("RTN", None), ("AWQ-scale", {"weight_clip": False}), ("AWQ", {})]:
        model, adapter = _tiny(kind)
        expected = model(ids).logits
        _apply(model, adapter, _config(special, bit=3, method=name.split("-")[0]), batches, True)
        assert all(
            isinstance(adapter.get_blocks(model)[0].get_submodule(n), FakeQuantLinear)
            for n in adapter.linear_names()
        )
        errors[name] = (model(ids).logits - expected).pow(2).mean().item()
    assert errors["AWQ-scale"] < 0.95 * errors["RTN"], errors
    assert errors["AWQ"] < 0.8 * errors["RTN"], errors


def test_compress_pipeline(tiny_model_dir):
    result = compress(
        tiny_config(tiny_model_dir, quant={"method": "AWQ", "weight": {"bit": 4, "group_size": 32}}),
        progress=False,
    )
    for block in result.adapter.get_blocks(result.model):
        assert all(isinstance(block.get_submodule(n), FakeQuantLinear) for n in result.adapter.linear_names())
    pretrain, quantized = result.ppl("pretrain"), result.ppl("fake_quant")
    assert 1 < pretrain < 1e4 and 1 < quantized < 1e4 and quantized != pretrain


@pytest.mark.parametrize(
    "final",
    [
        "RTN",
        pytest.param(
            "GPTQ", marks=pytest.mark.skipif("gptq" not in METHODS, reason="GPTQ is not implemented yet")
        ),
    ],
)
def test_composition_transforms_then_quantizes(tiny_llama_dir, final):
    """[AWQ, X]: AWQ only transforms (scales folded into the norms, nothing wrapped), X quantizes every target."""
    cfg = tiny_config(
        tiny_llama_dir,
        quant={
            "method": ["AWQ", final],
            "weight": {"bit": 4, "group_size": 32},
            "special": {"AWQ": {"weight_clip": False, "trans_version": "v1"}},
        },
    )
    cfg["eval"]["eval_pos"] = ["pretrain", "transformed", "fake_quant"]
    result = compress(cfg, progress=False)
    if final == "RTN":  # RTN keeps the float weights: the transformed model is the original function
        assert result.ppl("transformed") == pytest.approx(result.ppl("pretrain"), rel=1e-4)
    assert result.ppl("fake_quant") != pytest.approx(result.ppl("pretrain"), rel=1e-4)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).state_dict()
    norms = [k for k, v in result.model.state_dict().items() if k.endswith("layernorm.weight")]
    assert norms and all(not torch.equal(result.model.state_dict()[k], original[k]) for k in norms)
    blocks = result.adapter.get_blocks(result.model)
    assert all(
        isinstance(b.get_submodule(n), FakeQuantLinear) for b in blocks for n in result.adapter.linear_names()
    )


@pytest.mark.parametrize(
    "special, key",
    [
        ({"bogus": 1}, "bogus"),
        ({"trans_version": "v3"}, "trans_version"),
        ({"clip_version": "v2"}, "clip_version"),
        ({"n_grid": 0}, "n_grid"),
    ],
)
def test_bad_special_is_config_error(special, key):
    with pytest.raises(ConfigError, match=key):
        method_class("AWQ")(_config(special).quant)
    with pytest.raises(ConfigError, match=key):
        get_methods(_config({"Awq": special}, method=["AWQ", "RTN"]).quant)


def test_search_tokens_limits_the_scored_batches():
    from llmc.methods.awq_search import search_batches
    from llmc.pipeline import BlockContext
    from llmc.pipeline.capture import BlockInputs

    def ctx(masks):
        inputs = BlockInputs([torch.zeros(2, 8, 4)] * 5, [()] * 5, [{}] * 5, masks)
        return BlockContext(0, torch.nn.Identity(), None, inputs, CPU, [])

    assert search_batches(ctx([]), None) == 5
    assert search_batches(ctx([]), 40) == 2
    assert search_batches(ctx([]), 3) == 1
    masks = [torch.ones(2, 8, dtype=torch.bool)] * 4 + [None]
    masks[0] = torch.zeros(2, 8, dtype=torch.bool)
    assert search_batches(ctx(masks), 16) == 2


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_recording_in_the_pipeline_forward_changes_nothing(kind, tiny_llama_dir, tiny_opt_dir, monkeypatch):
    """The scale search's inputs recorded during the pipeline's float forward (no forward of AWQ's
    own) give the very weights that AWQ's own recording forward gives."""
    import contextlib

    import llmc.methods.awq as awq

    folder = {"llama": tiny_llama_dir, "opt": tiny_opt_dir}[kind]
    own: list[int] = []
    record = awq._record
    monkeypatch.setattr(awq, "_record", lambda ctx, groups, searched, clip_tokens: own.append(clip_tokens) or record(
        ctx, groups, searched, clip_tokens))
    weights = {}
    for observed in (True, False):
        if not observed:
            monkeypatch.setattr(awq.AWQ, "observe", lambda self, ctx: contextlib.nullcontext())
        cfg = tiny_config(folder, quant={"method": "AWQ", "weight": {"bit": 3, "group_size": 32}})
        result = compress(cfg, progress=False)
        weights[observed] = {k: v.clone() for k, v in result.model.state_dict().items()}
        # With observing, AWQ's own forwards are the clip step's only.
        blocks = len(result.adapter.get_blocks(result.model))
        assert own == ([512] * blocks if observed else [0, 512] * blocks)
        own.clear()
    for name, w in weights[True].items():
        assert torch.equal(w, weights[False][name]), name
