"""SparseGPT's joint sparsification and quantization (`sparse.special.joint_quant`): one sweep that
is GPTQ when nothing is pruned, keeps the exact pattern with every weight on the quant grid (as the
exports dequantize it), beats pruning then quantizing on a layer, stays close to it on a block with
one Hessian pass instead of several, runs through the pipeline and the exports, and refuses the
combinations it cannot do with one line."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from test_export_ct import assert_bit_equal
from test_gptq import TOY_ADAPTER, ToyBlock, correlated_inputs, layer, output_error, quantizer, toy_context
from test_sparse import block_linears, weight_of

from llmc import compress, load_config
from llmc.errors import ConfigError
from llmc.export import quantized_linears
from llmc.methods import gptq as gptq_module
from llmc.methods import sequential_passes as passes_module
from llmc.methods import sparsegpt as sparsegpt_module
from llmc.methods.gptq import gptq_quantize
from llmc.methods.sparse_base import is_pruned
from llmc.methods.sparsegpt import is_joint_quantized, sparsegpt_solve
from llmc.quant import FakeQuantLinear
from llmc.schedule import build_methods, method_targets


def group_scales(result, rows: int) -> torch.Tensor:
    return result.scale.view(rows, -1)[:, result.g_idx]


@pytest.mark.parametrize("group_size,static_groups", [(32, False), (256, False), (-1, False), (96, True)],
                         ids=["g32", "g256-across-blocks", "per-channel", "g96-static"])
def test_without_pruning_it_is_gptq(group_size, static_groups):
    w, _, h = layer(out=32, features=384, seed=2)
    q = quantizer(4, group_size)
    ref = gptq_quantize(w, h, q, static_groups=static_groups)
    joint = sparsegpt_solve(w, h, 0.0, None, quantizer=q, static_groups=static_groups)
    torch.testing.assert_close(joint.scale, ref.scale, rtol=1e-5, atol=0)
    assert torch.equal(joint.g_idx, ref.g_idx)
    flipped = (joint.weight - ref.weight).abs() > group_scales(ref, w.shape[0]) / 2  # another grid point
    assert flipped.float().mean() < 0.002


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2:4"])
@pytest.mark.parametrize("group_size", [32, 256], ids=["g32", "g256"])
def test_layer_pattern_grid_and_error(pattern, group_size):
    w, x, h = layer(out=64, features=256, seed=1)
    q = quantizer(3, group_size)
    joint = sparsegpt_solve(w, h, 0.5, pattern, quantizer=q)
    zeros = joint.weight == 0
    if pattern is None:
        assert (zeros.sum(dim=1) >= 128).all()
    else:
        assert (zeros.reshape(64, -1, 4).sum(dim=-1) >= 2).all()
    scale, zero = group_scales(joint, 64), joint.zero.view(64, -1)[:, joint.g_idx]
    codes = torch.clamp(torch.round(joint.weight / scale) + zero, q.qmin, q.qmax)
    torch.testing.assert_close((codes - zero) * scale, joint.weight, rtol=0, atol=1e-6)
    # One pass beats pruning, then GPTQ on the pruned weight (the paper's joint mode), and rounding.
    pruned = sparsegpt_solve(w, h, 0.5, pattern).weight
    sequential = gptq_quantize(pruned, h, q, keep_zeros=True).weight
    rtn = q.quant_dequant(pruned, *q.calc_qparams(pruned))
    errors = [output_error(w, v, x) for v in (joint.weight, sequential, rtn)]
    assert errors[0] < errors[1] < errors[2], errors


def run_block(sparse: dict, quant: dict, monkeypatch) -> tuple[torch.nn.Module, float, int]:
    """The toy block through the schedule's methods and targets; (block, output error, Hessian passes)."""
    calls = []

    def counted(original):
        def hessians(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)
        return hessians

    for module in (sparsegpt_module, gptq_module, passes_module):
        monkeypatch.setattr(module, "group_hessians", counted(module.group_hessians))
    torch.manual_seed(0)  # the toy linears' biases come from the global generator
    block = ToyBlock()
    x = correlated_inputs(tokens=4 * 64, features=64, seed=5).reshape(4, 64, 64)
    hidden = [x[:2], x[2:]]
    with torch.no_grad():
        expected = [block(h) for h in hidden]
    cfg = load_config({"model": {"path": "x"}, "sparse": sparse, "quant": quant})
    ctx = toy_context(block, hidden, [None, None])
    for method in build_methods(cfg):
        ctx.targets = method_targets(cfg, method, TOY_ADAPTER, block, 0)
        method.process_block(ctx)
    monkeypatch.undo()
    with torch.no_grad():
        error = sum(float((block(h) - e).pow(2).sum()) for h, e in zip(hidden, expected))
    return block, error, len(calls)


def sparse_cfg(pattern: str, joint: bool) -> dict:
    return {"method": "SparseGPT", "weight": {"sparsity": 0.5, "pattern": pattern}, "special": {"joint_quant": joint}}


W3 = {"bit": 3, "granularity": "per_group", "group_size": 32}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_block_pattern_grid_error_and_one_hessian_pass(pattern, monkeypatch):
    block, joint, passes = run_block(sparse_cfg(pattern, True), {"method": "GPTQ", "weight": W3}, monkeypatch)
    assert passes == 1  # SparseGPT's one forward; GPTQ finds nothing left to quantize
    for name in ("up", "gate", "down"):
        fq = block.get_submodule(name)
        assert isinstance(fq, FakeQuantLinear) and is_joint_quantized(fq) and is_pruned(fq), name
        assert fq.g_idx.shape == (fq.in_features,)
        w = fq.fake_weight()
        assert torch.equal(w, fq.weight), name  # Q is on the grid of the stored params
        if pattern == "unstructured":
            assert ((w == 0).sum(dim=1) >= fq.in_features // 2).all(), name
        else:
            assert ((w == 0).reshape(w.shape[0], -1, 4).sum(dim=-1) >= 2).all(), name
    for exported in quantized_linears(block):  # what every export writes dequantizes to the same weight
        assert torch.equal(exported.dequantized(), exported.module.fake_weight()), exported.name

    _, rtn, _ = run_block(sparse_cfg(pattern, False), {"method": "RTN", "weight": W3}, monkeypatch)
    _, gptq, gptq_passes = run_block(sparse_cfg(pattern, False), {"method": "GPTQ", "weight": W3}, monkeypatch)
    assert gptq_passes == 3  # SparseGPT's, then GPTQ's true-sequential one per group
    assert joint < rtn
    assert joint < 1.1 * gptq, (joint, gptq)


def test_rtn_joint_equals_gptq_joint(monkeypatch):
    """RTN has no special keys: its joint mode is GPTQ's with dynamic groups, bit for bit."""
    a, _, _ = run_block(sparse_cfg("2:4", True), {"method": "RTN", "weight": W3}, monkeypatch)
    b, _, _ = run_block(sparse_cfg("2:4", True), {"method": "Naive", "weight": W3}, monkeypatch)
    c, _, _ = run_block(sparse_cfg("2:4", True), {"method": "GPTQ", "weight": W3}, monkeypatch)
    for name in ("up", "gate", "down"):
        assert torch.equal(a.get_submodule(name).weight, c.get_submodule(name).weight)
        assert torch.equal(b.get_submodule(name).w_scale, c.get_submodule(name).w_scale)


def test_pipeline_ignored_layers_and_exports(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(tiny_llama_dir, save={"save_fake": True, "save_vllm": True, "save_gptq": True,
                                            "save_path": str(out)})
    del cfg["eval"]
    cfg["sparse"] = {**sparse_cfg("2:4", True), "ignored_layers": {"layer_names": ["self_attn.o_proj"]}}
    cfg["quant"] = {"method": "GPTQ", "weight": {"bit": 4, "group_size": 32, "symmetric": True},
                    "ignored_layers": {"layer_names": ["mlp.down_proj"]}}
    result = compress(load_config(cfg), progress=False)
    for name, module in block_linears(result):
        w = weight_of(module)
        n_m = ((w == 0).reshape(w.shape[0], -1, 4).sum(dim=-1) >= 2).all()
        if name.endswith("o_proj"):  # not pruned; GPTQ quantizes it in its own pass
            assert isinstance(module, FakeQuantLinear) and not is_joint_quantized(module) and not n_m, name
        elif name.endswith("down_proj"):  # pruned by SparseGPT alone, left in float
            assert not isinstance(module, FakeQuantLinear) and n_m, name
        else:
            assert is_joint_quantized(module) and n_m and torch.equal(w, module.weight), name
    assert_bit_equal(result, out / "vllm_quant_model")  # compressed-tensors' decompression == fake weights
    assert (out / "gptq_quant_model" / "config.json").exists()
    assert (out / "fake_quant_model" / "config.json").exists()


@pytest.mark.parametrize("sparse,quant,match", [
    (sparse_cfg("2:4", True), None, "needs quant.method GPTQ or RTN, not no quant section"),
    (sparse_cfg("2:4", True), {"method": "AWQ"}, "not quant.method AWQ"),
    (sparse_cfg("2:4", True), {"method": ["AWQ", "GPTQ"]}, r"not quant.method \['AWQ', 'GPTQ'\]"),
    (sparse_cfg("2:4", True), {"method": "SmoothQuant", "act": {"bit": 8}}, "not quant.method SmoothQuant"),
    (sparse_cfg("2:4", True), {"method": "RTN", "weight": {"quant_type": "float-quant", "bit": "e4m3",
                                                           "granularity": "per_channel"}}, "integer grid"),
    (sparse_cfg("2:4", True), {"method": "GPTQ", "special": {"actorder": True}}, "actorder: false"),
    ({"method": "Wanda", "weight": {"sparsity": 0.5}, "special": {"joint_quant": True}}, {"method": "GPTQ"},
     "joint_quant"),
])
def test_bad_combinations_are_one_line_config_errors(sparse, quant, match):
    cfg = load_config({"model": {"path": "x"}, "sparse": sparse, **({"quant": quant} if quant else {})})
    with pytest.raises(ConfigError, match=match) as info:
        build_methods(cfg)
    assert "\n" not in str(info.value)
