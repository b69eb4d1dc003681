"""SpQR (llmc/methods/spqr.py): outliers are kept at their float values exactly where the sensitivity
exceeds the threshold, the other weights lie on the grid of the quantized group statistics, the block
error beats RTN on a tiny Llama with planted outlier weights, and llmc's config keys load."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_model, tiny_config
from safetensors.torch import save_file
from torch import nn

from llmc import compress, load_config
from llmc.errors import ConfigError
from llmc.methods.hessian import inverse_hessian_cholesky
from llmc.methods.spqr import SpqrLinear, SpqrSpecial, spqr_qdq, spqr_quantize
from llmc.models import get_adapter
from llmc.pipeline import capture_block_inputs
from llmc.pipeline.blockwise import BlockContext, run_block
from llmc.pipeline.checkpoint import block_tensors, restore_block
from llmc.schedule import block_targets, build_methods

CPU = torch.device("cpu")
W3G16 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16}
LLMC_SPECIAL = {  # ModelTC/llmc configs/quantization/methods/SpQR/spqr_w_only.yml
    "actorder": True, "percdamp": 1, "blocksize": 128, "true_sequential": True, "relative_threshold": 0.2,
    "simplified_outliers": False,
    "scale": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16, "round_zp": False},
    "zero": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16, "round_zp": False},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def method(weight=W3G16, **special):
    cfg = load_config({"model": {"path": "/x"}, "quant": {"method": "SpQR", "weight": weight, "special": special}})
    return build_methods(cfg)[0]


def planted(rows=48, cols=64, seed=0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.1
    spots = [(3, 10), (17, 40), (30, 5), (44, 63)]
    for k, (r, c) in enumerate(spots):
        w[r, c] = 1.5 * (-1) ** k
    return w, spots


def solved_layer(weight: torch.Tensor, hessian: torch.Tensor, **special) -> tuple[SpqrLinear, object]:
    sp = SpqrSpecial(**special)
    res = spqr_quantize(weight, hessian, 3, False, 16, sp)
    fq = SpqrLinear(nn.Linear(weight.shape[1], weight.shape[0], bias=False),
                    method(**special).weight_quantizer)
    with torch.no_grad():
        fq.weight.copy_(res.weight)
    fq.set_result(res)
    return fq, res


@torch.no_grad()
def test_outliers_are_float_where_sensitivity_exceeds_the_threshold():
    # H = cI: no error reaches other columns, so each weight's sensitivity is (w - q(w))^2 / U_ii^2 of the
    # original weight and the outliers' float values are the original ones.
    weight, spots = planted()
    hessian = 2.0 * torch.eye(64)
    U = inverse_hessian_cholesky(hessian.clone(), 1.0)
    fractions = []
    for rt in (0.05, 0.2, 1.0, 4.0):
        fq, res = solved_layer(weight, hessian, relative_threshold=rt)
        mask = fq.outlier_mask
        fake = fq.fake_weight()
        assert torch.equal(fake, res.weight)  # the module reproduces the sweep exactly
        assert torch.equal(fake[mask], weight[mask])  # float values untouched
        sens = (weight - fq.quantized_weight()).square() / U.diagonal().square()
        tau = rt * (weight.var(dim=0) / U.diagonal().square()).mean()
        assert torch.equal(mask, sens > tau)  # exactly the weights whose sensitivity exceeds tau
        if mask.any():
            assert sens[mask].min() > sens[~mask].max()
        fractions.append(mask.float().mean().item())
        if rt <= 1.0:
            assert all(mask[r, c] for r, c in spots)
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > 0.02 > fractions[1] > fractions[-1]
    fq, _ = solved_layer(weight, hessian, relative_threshold="inf")
    assert not fq.outlier_mask.any()


@torch.no_grad()
def test_non_outliers_lie_on_the_quantized_statistics_grid():
    weight, spots = planted()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=gen) * torch.linspace(0.3, 2.0, 64)
    hessian = 2 / 256 * x.T @ x
    fq, res = solved_layer(weight, hessian, actorder=True)
    mask = fq.outlier_mask
    assert 0 < mask.sum() < 0.1 * mask.numel() and all(mask[r, c] for r, c in spots)
    fake = fq.fake_weight()
    assert torch.equal(fake, res.weight) and torch.equal(fake[mask], fq.weight[mask])
    scale = fq.w_scale.view(48, -1)[:, fq.g_idx]
    zero = fq.w_zero.view(48, -1)[:, fq.g_idx]
    codes = fake / scale + zero
    on_grid = (codes - codes.round()).abs() < 1e-3
    assert on_grid[~mask].all() and (codes[~mask].round() >= 0).all() and (codes[~mask].round() <= 7).all()
    assert not on_grid[mask].all()  # the float outliers are off the grid
    assert sorted(fq.g_idx.bincount().tolist()) == [16] * 4  # groups of 16 (act-order columns)

    def levels(stats: torch.Tensor) -> int:  # distinct values per (column group, 16 output rows)
        return max(len(stats[r : r + 16, g].unique()) for r in range(0, 48, 16) for g in range(stats.shape[1]))

    assert levels(fq.w_scale.view(48, -1)) <= 8 and levels(fq.w_zero.view(48, -1)) <= 8  # 3-bit statistics
    free, _ = solved_layer(weight, hessian, actorder=True, scale=None, zero=None)
    assert levels(free.w_scale.view(48, -1)) > 8  # the check can fail: float statistics


def llama_block_inputs(seed: int = 0):
    model = build_tiny_model("llama", 384, seed)
    adapter = get_adapter("auto", model.config.model_type)
    block = adapter.get_blocks(model)[0]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # sparse large weights, as in the SpQR paper's outlier structure
        for lin in (m for m in block.modules() if isinstance(m, nn.Linear)):
            hit = torch.rand(lin.weight.shape, generator=gen) < 0.005
            lin.weight[hit] *= 12
    ids = torch.randint(3, 384, (4, 64), generator=gen)
    inputs = capture_block_inputs(model, adapter, [{"input_ids": ids[:2], "attention_mask": None},
                                                   {"input_ids": ids[2:], "attention_mask": None}], CPU)
    return block, adapter, inputs


@torch.no_grad()
def test_block_error_below_rtn_with_planted_outliers():
    import copy

    block, adapter, inputs = llama_block_inputs()
    expected = run_block(block, inputs, CPU)
    spqr = method()
    targets = block_targets(spqr.quant.ignored_layers, adapter, block, 0)
    errors, outliers = {}, 0.0
    for name, m in (("SpQR", spqr), ("SpQR-no-outliers", method(relative_threshold="inf")),
                    ("RTN", build_methods(load_config({"model": {"path": "/x"},
                                                       "quant": {"method": "RTN", "weight": W3G16}}))[0])):
        b = copy.deepcopy(block)
        m.process_block(BlockContext(0, b, adapter, inputs, CPU, list(targets)))
        out = run_block(b, inputs, CPU)
        errors[name] = sum((o - e).pow(2).sum().item() for o, e in zip(out, expected))
        if name == "SpQR":
            layers = [mod for mod in b.modules() if isinstance(mod, SpqrLinear)]
            assert len(layers) == len(targets)
            outliers = sum(int(lin.outlier_mask.sum()) for lin in layers) / sum(lin.weight.numel() for lin in layers)
    assert errors["SpQR"] < 0.5 * errors["RTN"], errors
    assert errors["SpQR"] < errors["SpQR-no-outliers"] < errors["RTN"], errors
    assert 0.001 < outliers < 0.05


def test_compress_resume_and_export_refusal(tiny_llama_dir, tmp_path):
    quant = {"method": "SpQR", "weight": W3G16, "special": {"blocksize": 32}}
    cfg = tiny_config(tiny_llama_dir, quant=quant)
    cfg["eval"]["max_windows"] = 2
    result = compress(load_config(cfg), progress=False)
    assert math.isfinite(result.ppl("fake_quant"))
    layers = [m for m in result.model.modules() if isinstance(m, SpqrLinear)]
    assert len(layers) == 3 * 7 and all(m.outlier_mask.shape == m.weight.shape for m in layers)
    summary = result.method_results["SpQR"]
    outliers = sum(int(m.outlier_mask.sum()) for m in layers)
    assert summary["outliers"] == outliers and summary["weights"] == sum(m.weight.numel() for m in layers)
    # 3 bits + 6 bits of statistics per 16 weights + two fp16 params per 16 x 16 statistics, 32 per outlier
    assert summary["bits_per_weight"] == pytest.approx(3.625 + 32 * outliers / summary["weights"])
    # the resume checkpoint restores the layer class, statistics and mask
    block = result.model.model.layers[1]
    tensors, meta = block_tensors(block)
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    fresh = build_tiny_model("llama", result.model.config.vocab_size).model.layers[1]
    m = method(blocksize=32)
    restore_block(tmp_path / "b.safetensors", fresh, m.restore_linear)
    with torch.no_grad():
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            a, b = block.get_submodule(name), fresh.get_submodule(name)
            assert type(b) is SpqrLinear and torch.equal(a.outlier_mask, b.outlier_mask)
            assert torch.equal(a.fake_weight(), b.fake_weight())
    cfg["save"] = {"save_vllm": True, "save_path": str(tmp_path / "out")}
    with pytest.raises(ConfigError) as exc:
        compress(load_config(cfg), progress=False)
    assert "SpQR" in str(exc.value) and "save_vllm" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()
    assert m.export_refusal(["save_trans", "save_fake"]) is None


def test_llmc_keys_load_and_bad_keys_are_config_errors():
    m = method(**LLMC_SPECIAL)
    sp = m.special
    assert sp.relative_threshold == 0.2 and sp.actorder and sp.scale.bit == 3 and sp.zero.group_size == 16
    assert math.isinf(method(relative_threshold="inf").special.relative_threshold)
    assert method(scale=None).special.scale is None
    bad = [
        ({**LLMC_SPECIAL, "relative_treshold": 0.2}, "relative_treshold"),
        ({"scale": {"bits": 3}}, "bits"),
        ({"zero": {"granularity": "per_channel"}}, "granularity"),
        ({"relative_threshold": -1}, "relative_threshold"),
    ]
    for special, word in bad:
        with pytest.raises(ConfigError) as exc:
            method(**special)
        assert word in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="per_group"):
        method({"bit": 3, "granularity": "per_channel"})


def test_qdq_float_zero_grid():
    x = torch.tensor([[-1.0, 0.0, 0.3, 2.0]])
    s, z = torch.tensor([[3.0 / 7]]), torch.tensor([[7.0 / 3]])
    q = spqr_qdq(x, s, z, 7)
    assert torch.allclose(q[0, [0, 3]], torch.tensor([-1.0, 2.0]))  # the range's ends are on the grid


def test_shipped_config_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "spqr_w3.yml")
    m = build_methods(cfg)[0]
    assert m.name == "SpQR" and m.special.scale.bit == 3 and m.special.relative_threshold == 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_partial_group_symmetric_per_tensor_statistics(dtype):
    weight, _ = planted(cols=72)  # 4 groups of 16 and one of 8
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 72, generator=gen)
    sp = {"scale": {"bit": 4, "granularity": "per_tensor"}, "blocksize": 40}  # blocks of 32 columns
    wcfg = {**W3G16, "symmetric": True, "partial_group": True}
    m = method(wcfg, **sp)
    res = spqr_quantize(weight.to(dtype), 2 / 200 * x.T @ x, 3, True, 16, m.special)
    fq = SpqrLinear(nn.Linear(72, 48, bias=False, dtype=dtype), m.weight_quantizer)
    fq.weight.copy_(res.weight.to(dtype))
    fq.set_result(res)
    fake, mask = fq.fake_weight(), fq.outlier_mask
    assert fake.dtype == dtype and torch.equal(fake, res.weight.to(dtype)) and mask.any()
    scales = fq.w_scale.view(48, -1)
    assert scales.shape[1] == 5 and all(len(scales[:, g].unique()) <= 16 for g in range(5))  # 4-bit, one range
    assert (fq.w_zero == 4).all()  # symmetric 3-bit grid: constant zero (maxq + 1) / 2, never quantized
    quantized = fq.quantized_weight()  # float32; a bf16 weight holds its rounding
    assert torch.equal(fake[~mask], quantized.to(dtype)[~mask])
    codes = quantized / scales[:, fq.g_idx] + 4
    assert ((codes - codes.round()).abs() < 1e-3)[~mask].all()
