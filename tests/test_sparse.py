"""Sparsification: exact patterns, zeros that survive quantization, Wanda's ranking against a direct
reference, SparseGPT's advantage on correlated inputs, ShortGPT's block removal and reload, OWL."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from test_gptq import ToyBlock, correlated_inputs, toy_context
from transformers import AutoModelForCausalLM

from llmc import compress, load_config
from llmc.config.schema import SparseSection
from llmc.data import build_calibration, bundled_path, read_documents
from llmc.errors import ConfigError
from llmc.methods.sparse_base import owl_sparsity, prune_mask, sparse_method
from llmc.quant import fake_quant_modules

CPU = torch.device("cpu")


def run(model_dir, sparse: dict, quant: dict | None = None, save: dict | None = None, evaluate: bool = False):
    cfg = tiny_config(model_dir, sparse=sparse)
    if evaluate:
        cfg["eval"]["eval_pos"] = ["pretrain", "transformed", "fake_quant"]
    else:
        del cfg["eval"]
    if quant:
        cfg["quant"] = quant
    if save:
        cfg["save"] = save
    return compress(load_config(cfg), progress=False)


def block_linears(result):
    for i, block in enumerate(result.adapter.get_blocks(result.model)):
        for name in result.adapter.block_linear_names(block):
            yield f"{i}.{name}", block.get_submodule(name)


def weight_of(module) -> torch.Tensor:
    return module.fake_weight() if hasattr(module, "fake_weight") and module.enabled else module.weight


def test_prune_mask_patterns():
    scores = torch.rand(8, 32, generator=torch.Generator().manual_seed(0))
    assert (prune_mask(scores, 0.25, None).sum(dim=1) == 8).all()
    mask = prune_mask(scores, 0.0, (2, 4)).reshape(8, 8, 4)
    assert (mask.sum(dim=-1) == 2).all()
    # the pruned ones are the lowest scores of their group
    groups = scores.reshape(8, 8, 4)
    assert (groups[mask].reshape(8, 8, 2).max(dim=-1).values <= groups[~mask].reshape(8, 8, 2).min(dim=-1).values).all()


@pytest.mark.parametrize("method", ["Magnitude", "Wanda", "SparseGPT"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_exact_pattern_and_zeros_survive_quantization(tiny_llama_dir, method, pattern):
    sparse = {"method": method, "weight": {"sparsity": 0.5, "pattern": pattern}}
    quant = {"method": "GPTQ", "weight": {"bit": 4, "group_size": 32}}
    result = run(tiny_llama_dir, sparse, quant, evaluate=pattern == "2:4" and method == "Wanda")
    for name, module in block_linears(result):
        w = weight_of(module)
        assert module.enabled, name
        zeros = w == 0
        if pattern == "unstructured":
            assert (zeros.sum(dim=1) >= w.shape[1] // 2).all(), name
        else:
            assert (zeros.reshape(w.shape[0], -1, 4).sum(dim=-1) >= 2).all(), name
    if result.perplexity:  # both positions are measured on the pruned model (GPTQ writes Q into the weights)
        assert result.ppl("transformed") != result.ppl("pretrain")


@pytest.mark.parametrize("quant", [
    {"method": "RTN", "weight": {"bit": 4, "group_size": 32}},
    {"method": "AWQ", "weight": {"bit": 4, "group_size": 32}},
    {"method": "SmoothQuant", "weight": {"bit": 8, "granularity": "per_channel"}, "act": {"bit": 8}},
], ids=["rtn", "awq", "smoothquant"])
def test_zeros_survive_other_quantizers(tiny_llama_dir, quant):
    result = run(tiny_llama_dir, {"method": "Wanda", "weight": {"sparsity": 0.5}}, quant)
    for name, module in block_linears(result):
        w = weight_of(module)
        assert ((w == 0).sum(dim=1) >= w.shape[1] // 2).all(), name


def test_wanda_mask_equals_direct_ranking(tiny_llama_dir, tiny_tokenizer):
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    # With the dense model's activations feeding every block, each block's inputs are the dense model's.
    result = run(tiny_llama_dir, {"method": "Wanda", "weight": {"sparsity": 0.5}, "sparsity_out": False})
    c = result.config.calib
    batches = build_calibration(read_documents(bundled_path("wikitext2", "calib")), result.tokenizer, c.n_samples,
                                c.seq_len, c.bs, c.preproc, result.config.calib_seed)
    sums: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: sums.__setitem__(
        n, sums.get(n, 0) + a[0].reshape(-1, a[0].shape[-1]).pow(2).sum(0)))
        for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for batch in batches:
            dense(input_ids=batch["input_ids"])
    for h in hooks:
        h.remove()
    pruned = dict(result.model.named_modules())
    for name, norm in sums.items():
        w = dense.get_submodule(name).weight
        score = w.abs() * norm.sqrt()[None, :]
        expected = torch.zeros_like(w, dtype=torch.bool).scatter_(
            1, score.argsort(dim=1)[:, : w.shape[1] // 2], True)
        assert torch.equal(pruned[name].weight == 0, expected), name


def _block_error(method: str, pattern: str) -> float:
    torch.manual_seed(0)  # the toy linears' biases come from the global generator: the same block for every method
    block = ToyBlock()
    x = correlated_inputs(tokens=4 * 64, features=64, seed=5).reshape(4, 64, 64)
    hidden = [x[:2], x[2:]]
    with torch.no_grad():
        expected = [block(h) for h in hidden]
    ctx = toy_context(block, hidden, [None, None])
    sparse_method(SparseSection(method=method, weight={"sparsity": 0.5, "pattern": pattern})).process_block(ctx)
    with torch.no_grad():
        return sum(float((block(h) - e).pow(2).sum()) for h, e in zip(hidden, expected))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_and_magnitude(pattern):
    errors = {m: _block_error(m, pattern) for m in ("SparseGPT", "Wanda", "Magnitude")}
    assert errors["SparseGPT"] < errors["Wanda"] < errors["Magnitude"], errors


def test_shortgpt_removes_lowest_influence_and_reloads(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = run(tiny_llama_dir, {"method": "ShortGPT", "weight": {"n_prune_layers": 1}},
                 save={"save_trans": True, "save_path": str(out)})
    summary = result.methods[0]
    influence = summary["block_influence"]
    assert summary["removed_blocks"] == [min(range(len(influence)), key=influence.__getitem__)]
    assert len(result.adapter.get_blocks(result.model)) == 2 == result.model.config.num_hidden_layers
    reloaded = AutoModelForCausalLM.from_pretrained(out / "transformed_model", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 2
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-5)
    saved = json.loads((out / "results.json").read_text())
    assert saved["sparse"][0]["removed_blocks"] == summary["removed_blocks"]


def test_owl_layer_sparsity_averages_the_target(tiny_llama_dir):
    assert owl_sparsity({0: 0.1, 1: 0.3, 2: 0.2}, 0.5, 0.08) == pytest.approx([0.58, 0.42, 0.5])
    result = run(tiny_llama_dir, {"method": "Wanda", "weight": {"sparsity": 0.5, "layer_sparsity": "owl"}})
    per_block = result.methods[0]["owl_block_sparsity"]
    assert len(per_block) == 3 and sum(per_block) / 3 == pytest.approx(0.5)
    for i, block in enumerate(result.adapter.get_blocks(result.model)):
        w = block.get_submodule("mlp.up_proj").weight
        assert int((w == 0).sum(dim=1)[0]) == int(per_block[i] * w.shape[1])


def test_layer_sparsity_list_and_bad_configs(tiny_llama_dir):
    result = run(tiny_llama_dir, {"method": "Magnitude", "weight": {"layer_sparsity": [0.25, 0.5, 0.75]}})
    for i, frac in enumerate([0.25, 0.5, 0.75]):
        w = result.adapter.get_blocks(result.model)[i].get_submodule("self_attn.q_proj").weight
        assert ((w == 0).sum(dim=1) == int(frac * w.shape[1])).all()
    with pytest.raises(ConfigError, match="one sparsity per block"):
        run(tiny_llama_dir, {"method": "Magnitude", "weight": {"layer_sparsity": [0.5]}})
    with pytest.raises(ConfigError, match="n_prune_layers"):
        run(tiny_llama_dir, {"method": "ShortGPT", "weight": {"n_prune_layers": 3}})
    with pytest.raises(ConfigError, match="unknown sparse.method 'Wandaa'; did you mean 'Wanda'"):
        run(tiny_llama_dir, {"method": "Wandaa", "weight": {"sparsity": 0.5}})
    with pytest.raises(ConfigError, match="sparse.weight.sparsity"):
        run(tiny_llama_dir, {"method": "Wanda"})
    with pytest.raises(ConfigError, match="pattern"):
        load_config({"model": {"path": "x"}, "sparse": {"method": "Wanda", "weight": {"pattern": "4:2"}}})


def test_sparsity_out_defaults():
    from llmc.schedule import build_methods, resolve_block_out

    def block_out(sparse, quant=None):
        cfg = load_config({"model": {"path": "x"}, "sparse": sparse, **({"quant": quant} if quant else {})})
        return resolve_block_out(cfg, build_methods(cfg))

    half = {"sparsity": 0.5}
    assert block_out({"method": "Wanda", "weight": half}) is True
    assert block_out({"method": "SparseGPT", "weight": half}) is True
    assert block_out({"method": "Magnitude", "weight": half}) is False
    assert block_out({"method": "ShortGPT", "weight": {"n_prune_layers": 1}}) is False
    assert block_out({"method": "Wanda", "weight": half, "sparsity_out": False}) is False
    rtn = {"method": "RTN", "weight": {"bit": 4}}
    assert block_out({"method": "Magnitude", "weight": half}, rtn) is False
    assert block_out({"method": "Wanda", "weight": half}, {**rtn, "quant_out": False}) is False


def test_fake_quant_modules_count_unchanged_by_pruning(tiny_llama_dir):
    result = run(tiny_llama_dir, {"method": "Magnitude", "weight": {"sparsity": 0.5}},
                 {"method": "RTN", "weight": {"bit": 4, "group_size": 32}})
    assert len(fake_quant_modules(result.model)) == 3 * 7
