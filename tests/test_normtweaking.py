"""NormTweaking: after RTN or GPTQ it lowers the block's distribution loss and output error
against the float block by changing only the norms; it composes after GPTQ through the runner
(and not before it), and alone it quantizes (RTN) and then tunes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import build_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from llmc import compress
from llmc.config import load_config
from llmc.errors import ConfigError
from llmc.methods import get_methods
from llmc.methods.lifecycle import ModelContext
from llmc.methods.normtweaking import NormTweaking, dist_loss
from llmc.models import get_adapter
from llmc.pipeline import BlockwisePipeline, capture_block_inputs
from llmc.pipeline.blockwise import run_block
from llmc.quant import FakeQuantLinear, fake_quant_modules

CPU = torch.device("cpu")
TWEAK = {"ntweak_lr": 1e-3, "epochs": 10}


def _quant(names: list[str], bits: int, special: dict):
    return load_config({"model": {"path": "unused"}, "quant": {
        "method": names,
        "weight": {"bit": bits, "symmetric": False, "granularity": "per_group", "group_size": 32},
        "special": special,
    }}).quant


def _run(model, adapter, inputs, methods, ignored: tuple[int, ...] = ()) -> None:
    """The schedule's per-block steps (llmc.schedule): every prepare_block, then every process_block."""
    for method in methods:
        method.prepare_model(ModelContext(model, adapter))

    def process(ctx):
        for method in methods:
            method.prepare_block(ctx)
        for method in methods:
            method.process_block(ctx)

    BlockwisePipeline(model, adapter, CPU, quant_out=True, progress=False).run(
        inputs, process, targets=lambda i: [] if i in ignored else adapter.linear_names()
    )


def _setup(kind: str):
    model = build_tiny_model(kind, 384, seed=3)
    adapter = get_adapter("auto", model.config.model_type)
    ids = torch.randint(3, 384, (4, 64), generator=torch.Generator().manual_seed(5))
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": None} for i in (0, 2)]
    return model, adapter, capture_block_inputs(model, adapter, batches, CPU)


def _block_state(model, adapter) -> dict[str, torch.Tensor]:
    """Block 0's parameters and fake-quant parameters."""
    block = adapter.get_blocks(model)[0]
    state = {n: p.detach().clone() for n, p in block.named_parameters()}
    for name, m in block.named_modules():
        if isinstance(m, FakeQuantLinear):
            state[f"{name}.w_scale"], state[f"{name}.w_zero"] = m.w_scale.clone(), m.w_zero.clone()
    return state


@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize(("quantizer", "bits"), [("RTN", 3), ("GPTQ", 4)])
def test_tweaking_lowers_block_error_and_changes_only_norms(kind, quantizer, bits):
    base, adapter, inputs = _setup(kind)
    block0 = adapter.get_blocks(base)[0]
    with torch.no_grad():
        reference = run_block(block0, inputs, CPU)
    results = {}
    for names, special in (([quantizer], {}), ([quantizer, "NormTweaking"], {"NormTweaking": TWEAK})):
        if quantizer == "RTN" and len(names) == 2:
            names, special = ["NormTweaking"], TWEAK  # alone, NormTweaking quantizes with RTN
        model = copy.deepcopy(base)
        methods = get_methods(_quant(names, bits, special))
        _run(model, adapter, inputs, methods)
        with torch.no_grad():
            out = run_block(adapter.get_blocks(model)[0], inputs, CPU)
        rel = float((torch.cat(out) - torch.cat(reference)).norm() / torch.cat(reference).norm())
        dist = sum(float(dist_loss(o.reshape(-1, o.shape[-1]), r.reshape(-1, r.shape[-1])))
                   for o, r in zip(out, reference)) / len(out)
        results[names[-1]] = (rel, dist, _block_state(model, adapter), methods[-1])
    plain, tweaked = results[quantizer], results["NormTweaking"]
    assert tweaked[1] < plain[1] * 0.95, (plain[:2], tweaked[:2])  # the paper's loss
    assert tweaked[0] < plain[0], (plain[:2], tweaked[:2])  # and the output error
    roles = adapter.block_roles
    norms = {f"{n}.{p}" for n in (roles.attn_norm, roles.mlp_norm) for p in ("weight", "bias")} & plain[2].keys()
    changed = {n for n in plain[2] if not torch.equal(plain[2][n], tweaked[2][n])}
    assert changed == norms  # the norms (OPT: with their biases) and nothing else
    log = tweaked[3].block_losses
    assert len(log) == len(adapter.get_blocks(base)) and log[0]["after"] < log[0]["before"] and log[0]["lr"] > 0


def test_no_improvement_keeps_the_norms():
    base, adapter, inputs = _setup("llama")
    methods = get_methods(_quant(["NormTweaking"], 4, {"ntweak_lr": [1e3], "epochs": 2}))  # diverges
    _run(base, adapter, inputs, methods)
    before = build_tiny_model("llama", 384, seed=3)
    for block, original in zip(adapter.get_blocks(base), adapter.get_blocks(before)):
        assert torch.equal(block.input_layernorm.weight, original.input_layernorm.weight)
        assert isinstance(block.self_attn.q_proj, FakeQuantLinear)  # quantized all the same
    assert all(entry["lr"] == 0.0 and entry["after"] == entry["before"] for entry in methods[0].block_losses)


def test_learning_rate_grows_with_depth():
    base, adapter, inputs = _setup("llama")
    methods = get_methods(_quant(["NormTweaking"], 4, {"ntweak_lr": [1e-3], "epochs": 1, "gamma": 3.0}))
    _run(base, adapter, inputs, methods)
    rates = [entry["lr"] for entry in methods[0].block_losses]
    blocks = len(adapter.get_blocks(base))
    assert rates == pytest.approx([1e-3 * (1 + 3.0 * i / blocks) for i in range(blocks)])


def test_block_left_in_float_is_not_tweaked():
    base, adapter, inputs = _setup("llama")
    original = copy.deepcopy(base)
    methods = get_methods(_quant(["NormTweaking"], 3, TWEAK))
    _run(base, adapter, inputs, methods, ignored=(1,))
    blocks, before = adapter.get_blocks(base), adapter.get_blocks(original)
    assert not torch.equal(blocks[0].input_layernorm.weight, before[0].input_layernorm.weight)
    assert torch.equal(blocks[1].input_layernorm.weight, before[1].input_layernorm.weight)
    assert not fake_quant_modules(blocks[1]) and len(methods[0].block_losses) == len(blocks) - 1


def test_composition_runs_through_the_runner(tiny_llama_dir, tmp_path):
    weight = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
    common = {"calib": {"name": "wikitext2", "n_samples": 4, "seq_len": 32, "bs": 2}}
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    norm = "model.layers.1.post_attention_layernorm.weight"
    runs = {}
    for names in (["GPTQ"], ["GPTQ", "NormTweaking"]):
        cfg = tiny_config(tiny_llama_dir, quant={"method": names, "weight": weight,
                                                 "special": {"NormTweaking": TWEAK} if len(names) > 1 else {}},
                          **common)
        cfg["eval"]["eval_pos"] = ["fake_quant"]
        if len(names) > 1:
            cfg["save"] = {"save_fake": True, "save_path": str(tmp_path / "out")}
        runs[names[-1]] = compress(cfg, progress=False)
    result = runs["NormTweaking"]
    assert len(fake_quant_modules(result.model)) == len(fake_quant_modules(runs["GPTQ"].model)) > 0
    assert all(type(m).__name__ == type(g).__name__ for (_, m), (_, g) in
               zip(fake_quant_modules(result.model), fake_quant_modules(runs["GPTQ"].model)))
    assert math.isfinite(result.ppl("fake_quant"))
    tweaked = result.model.state_dict()[norm]
    assert torch.equal(runs["GPTQ"].model.state_dict()[norm], original.state_dict()[norm])
    assert not torch.equal(tweaked, original.state_dict()[norm])
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "fake_quant_model", dtype=torch.float32)
    assert torch.equal(saved.state_dict()[norm], tweaked)  # the tweak is part of the saved model


def test_tuner_before_the_quantizer_is_refused():
    with pytest.raises(ConfigError) as err:
        get_methods(_quant(["NormTweaking", "GPTQ"], 4, {}))
    message = str(err.value)
    assert "\n" not in message and "NormTweaking" in message and "[GPTQ, NormTweaking]" in message
    methods = get_methods(_quant(["GPTQ", "NormTweaking"], 4, {}))
    assert [m.final for m in methods] == [True, False]
    assert get_methods(_quant(["NormTweaking"], 4, {}))[0].final


def test_bad_special_keys():
    for special, key in (({"ntweak_lr": 0}, "ntweak_lr"), ({"ntweak_lr": []}, "ntweak_lr"),
                         ({"epoch": 3}, "epoch"), ({"loss": "kl"}, "loss")):
        with pytest.raises(ConfigError, match=key):
            NormTweaking(_quant(["NormTweaking"], 4, special))
    method = NormTweaking(_quant(["NormTweaking"], 4, {"ntweak_lr": 1e-6, "deactive_amp": True, "gamma": 0.001}))
    assert method.rates == [1e-6] and method.special.epochs == 50 and method.special.loss == "dist"
