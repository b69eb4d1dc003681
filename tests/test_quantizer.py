"""Properties of IntQuantizer (ranges, quantize-dequantize, codes, STE) and FakeQuantLinear."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from llmc.quant.fake_linear import FakeQuantLinear, fake_quant_modules, quant_disabled
from llmc.quant.quantizer import IntQuantizer, round_ste

SETTINGS = settings(
    derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
ROW_KINDS = ("normal", "normal", "outlier", "constant", "zero", "positive", "negative")


def make_tensor(seed: int, rows: int, cols: int, kinds: list[str], magnitude: float) -> torch.Tensor:
    """A float32 tensor from a seeded generator; each row shaped by its kind."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * magnitude
    for r, kind in enumerate(kinds):
        if kind == "outlier":
            x[r] *= 100.0
            x[r, int(torch.randint(cols, (1,), generator=gen))] *= 50.0
        elif kind == "constant":
            x[r] = float(torch.randn(1, generator=gen)) * magnitude
        elif kind == "zero":
            x[r] = 0.0
        elif kind == "positive":
            x[r] = x[r].abs() + magnitude
        elif kind == "negative":
            x[r] = -x[r].abs() - magnitude
    return x


@st.composite
def cases(draw, granularities=("per_tensor", "per_channel", "per_group", "per_token"), partial: bool = False):
    """(quantizer kwargs, tensor): widths always divisible by group_size unless `partial`."""
    granularity = draw(st.sampled_from(granularities))
    bit = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    rows = draw(st.integers(1, 10))
    group_size = -1
    if granularity == "per_group":
        group_size = draw(st.sampled_from([4, 8, 16]))
        if partial:
            cols = group_size * draw(st.integers(0, 4)) + draw(st.integers(1, group_size - 1))
        else:
            cols = group_size * draw(st.integers(1, 5))
    else:
        cols = draw(st.integers(1, 40))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=rows, max_size=rows))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    x = make_tensor(seed, rows, cols, kinds, magnitude)
    kwargs = {"bit": bit, "symmetric": symmetric, "granularity": granularity, "group_size": group_size,
              "partial_group": partial}
    return kwargs, x


def per_element(q: IntQuantizer, per_row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a `[rows, 1]` per-row tensor back to `x`'s shape."""
    return q.unrows(per_row.expand_as(q.rows(x)), x.shape)


def row_absmax(q: IntQuantizer, x: torch.Tensor) -> torch.Tensor:
    return per_element(q, q.rows(x).abs().amax(dim=1, keepdim=True), x)


# ---------------------------------------------------------------- IntQuantizer


@SETTINGS
@given(cases())
def test_minmax_error_is_at_most_half_a_step(case):
    kwargs, x = case
    q = IntQuantizer(**kwargs)
    scale, zero = q.calc_qparams(x)
    rows = q.rows(x).shape[0]
    assert scale.shape == (rows, 1) and zero.shape == (rows, 1)
    assert torch.all(scale > 0)
    y = q.quant_dequant(x, scale, zero)
    assert y.shape == x.shape and y.dtype == x.dtype
    bound = per_element(q, scale, x) / 2 + 1e-6 * row_absmax(q, x)
    assert torch.all((x - y).abs() <= bound)
    assert torch.equal(q.fake_quant(x), y)


@SETTINGS
@given(cases(), st.sampled_from(["minmax", "mse"]))
def test_quant_dequant_is_idempotent(case, calib_algo):
    kwargs, x = case
    q = IntQuantizer(**kwargs, calib_algo=calib_algo)
    scale, zero = q.calc_qparams(x)
    once = q.quant_dequant(x, scale, zero)
    twice = q.quant_dequant(once, scale, zero)
    assert torch.all((twice - once).abs() <= 1e-6 * per_element(q, scale, x))


@SETTINGS
@given(cases())
def test_symmetric_ranges_are_symmetric(case):
    kwargs, x = case
    kwargs["symmetric"] = True
    q = IntQuantizer(**kwargs)
    assert (q.qmin, q.qmax) == (-q.qmax - 1, 2 ** (q.bit - 1) - 1)
    scale, zero = q.calc_qparams(x)
    assert torch.all(zero == 0)
    absmax = q.rows(x).abs().amax(dim=1, keepdim=True)
    nonzero = absmax > 0
    torch.testing.assert_close(scale[nonzero], (absmax / q.qmax)[nonzero], rtol=1e-6, atol=0)
    # Values far outside the range clamp to exactly -(qmax+1) * scale and qmax * scale.
    big = 10 * (row_absmax(q, x) + 1)
    s = per_element(q, scale, x)
    assert torch.equal(q.quant_dequant(big, scale, zero), q.qmax * s)
    assert torch.equal(q.quant_dequant(-big, scale, zero), (-q.qmax - 1) * s)
    assert torch.all(q.quantize(big, scale, zero) == q.qmax)
    assert torch.all(q.quantize(-big, scale, zero) == q.qmin)
    # The ordinary tensor's codes never need the extra negative code.
    assert q.quantize(x, scale, zero).min() >= -q.qmax


@SETTINGS
@given(cases(), st.sampled_from(["minmax", "mse"]))
def test_codes_are_in_range_and_dequantize_to_qdq(case, calib_algo):
    kwargs, x = case
    q = IntQuantizer(**kwargs, calib_algo=calib_algo)
    scale, zero = q.calc_qparams(x)
    if not q.symmetric:
        assert torch.all(zero == zero.round()) and torch.all((zero >= q.qmin) & (zero <= q.qmax))
    codes = q.quantize(x, scale, zero)
    assert codes.shape == x.shape and codes.dtype == torch.int32
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    deq = (codes.float() - per_element(q, zero, x)) * per_element(q, scale, x)
    torch.testing.assert_close(q.quant_dequant(x, scale, zero), deq, rtol=0, atol=0)


@settings(derandomize=True, deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_mse_never_worse_than_minmax(case):
    kwargs, x = case
    errs = {}
    for algo in ("minmax", "mse"):
        q = IntQuantizer(**kwargs, calib_algo=algo)
        errs[algo] = (q.fake_quant(x).double() - x.double()).pow(2).sum().item()
    assert errs["mse"] <= errs["minmax"] * (1 + 1e-5) + 1e-30


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clips_gaussian_tails(symmetric):
    """At 3 bits, clipping the tails of a Gaussian row lowers the error: mse is not just minmax."""
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(0))
    q = IntQuantizer(3, symmetric, "per_channel")
    mm_scale, _ = q.calc_qparams(x)
    mse_q = IntQuantizer(3, symmetric, "per_channel", calib_algo="mse")
    mse_scale, _ = mse_q.calc_qparams(x)
    assert torch.all(mse_scale < mm_scale)
    assert (mse_q.fake_quant(x) - x).pow(2).sum() < 0.7 * (q.fake_quant(x) - x).pow(2).sum()


@SETTINGS
@given(cases(granularities=("per_group",), partial=True))
def test_partial_groups(case):
    kwargs, x = case
    q = IntQuantizer(**kwargs)
    gs = q.group_size
    scale, zero = q.calc_qparams(x)
    groups = -(-x.shape[-1] // gs)
    assert scale.shape == (x.shape[0] * groups, 1)
    y = q.quant_dequant(x, scale, zero)
    assert y.shape == x.shape
    assert q.quantize(x, scale, zero).shape == x.shape
    bound = per_element(q, scale, x) / 2 + 1e-6 * row_absmax(q, x)
    assert torch.all((x - y).abs() <= bound)
    # The narrower last group gets the range of its own columns only.
    tail = x[:, (groups - 1) * gs :]
    tail_scale, tail_zero = IntQuantizer(q.bit, q.symmetric, "per_channel").calc_qparams(tail)
    torch.testing.assert_close(scale.reshape(x.shape[0], groups)[:, -1:], tail_scale, rtol=0, atol=0)
    torch.testing.assert_close(zero.reshape(x.shape[0], groups)[:, -1:], tail_zero, rtol=0, atol=0)
    tail_q = IntQuantizer(q.bit, q.symmetric, "per_channel")
    torch.testing.assert_close(y[:, (groups - 1) * gs :], tail_q.quant_dequant(tail, tail_scale, tail_zero),
                               rtol=0, atol=0)
    strict = IntQuantizer(**{**kwargs, "partial_group": False})
    with pytest.raises(ValueError, match="group_size"):
        strict.calc_qparams(x)
    with pytest.raises(ValueError, match="group_size"):
        strict.quant_dequant(x, scale, zero)


def test_per_token_activations_3d():
    x = make_tensor(3, 6, 24, ["normal", "outlier", "zero", "constant", "normal", "positive"], 1.0).reshape(2, 3, 24)
    q = IntQuantizer(8, False, "per_token")
    scale, _ = q.calc_qparams(x)
    assert scale.shape == (6, 1)
    y = q.fake_quant(x)
    assert y.shape == x.shape
    assert torch.all((x - y).abs() <= per_element(q, scale, x) / 2 + 1e-6 * row_absmax(q, x))
    assert torch.all(y.reshape(6, 24)[2] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_keeps_dtype(dtype):
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = IntQuantizer(4, False, "per_group", 16)
    scale, zero = q.calc_qparams(x)
    assert scale.dtype == torch.float32
    y = q.quant_dequant(x, scale, zero)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, q.quant_dequant(x.float(), scale, zero).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [{"bit": 1}, {"bit": 9}, {"granularity": "per_block"}, {"granularity": "per_group", "group_size": -1},
     {"calib_algo": "kl"}],
)
def test_invalid_quantizer_settings(kwargs):
    base = {"bit": 4, "symmetric": False, "granularity": "per_channel"}
    with pytest.raises(ValueError):
        IntQuantizer(**{**base, **kwargs})


def test_round_ste_has_identity_gradient():
    x = (torch.randn(50, generator=torch.Generator().manual_seed(2)) * 5).requires_grad_()
    y = round_ste(x)
    assert torch.equal(y.detach(), x.detach().round())
    (y * torch.arange(50.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(50.0))


@pytest.mark.parametrize("granularity,group_size", [("per_tensor", -1), ("per_channel", -1), ("per_group", 8)])
@pytest.mark.parametrize("calib_algo", ["minmax", "mse"])
def test_quant_dequant_passes_gradients(granularity, group_size, calib_algo):
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()
    q = IntQuantizer(4, False, granularity, group_size, calib_algo=calib_algo)
    scale, zero = q.calc_qparams(x)
    assert not scale.requires_grad
    y = q.quant_dequant(x, scale, zero)
    assert y.requires_grad
    y.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if calib_algo == "minmax":  # nothing is clamped: the gradient is exactly dL/dy
        torch.testing.assert_close(x.grad, 2 * y.detach(), rtol=1e-6, atol=1e-7)
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------- FakeQuantLinear


def make_linear(in_f: int = 32, out_f: int = 16, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "wq", [IntQuantizer(4, False, "per_group", 8), IntQuantizer(3, True, "per_channel"), IntQuantizer(8, False, "per_tensor")]
)
def test_weight_only_fake_linear(wq, bias):
    lin = make_linear(bias=bias)
    ref = copy.deepcopy(lin)
    fq = FakeQuantLinear(lin, wq)
    x = inputs(2, 5, 32)
    assert torch.equal(fq.fake_weight(), wq.fake_quant(ref.weight))
    assert not torch.equal(fq.fake_weight(), ref.weight)
    out = fq(x)
    assert torch.equal(out, F.linear(x, fq.fake_weight(), ref.bias))
    assert not torch.allclose(out, ref(x))
    with quant_disabled(fq):
        assert torch.equal(fq(x), ref(x))
    assert fq.enabled and torch.equal(fq(x), out)
    assert torch.equal(fq.weight, ref.weight)  # the float weight is kept


def test_wrap_keeps_state_dict_keys_and_quant_disabled_restores_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 8, bias=False)))
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    FakeQuantLinear.wrap(model, "0", IntQuantizer(4, False, "per_group", 8))
    fq2 = FakeQuantLinear.wrap(model, "2.0", IntQuantizer(4, True, "per_channel"))
    assert [n for n, _ in fake_quant_modules(model)] == ["0", "2.0"]
    assert list(model.state_dict()) == keys
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    x = inputs(4, 16)
    assert not torch.allclose(model(x), ref(x))
    with quant_disabled(model):
        assert torch.equal(model(x), ref(x))
    # Re-wrapping replaces the quantizer and keeps the same float parameter.
    weight = fq2.weight
    fq3 = FakeQuantLinear.wrap(model, "2.0", IntQuantizer(8, True, "per_channel"))
    assert fq3.weight is weight and model[2][0] is fq3
    assert list(model.state_dict()) == keys
    assert torch.equal(fq3.fake_weight(), IntQuantizer(8, True, "per_channel").fake_quant(ref[2][0].weight))
    assert "w8 sym per_channel" in repr(fq3)


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_activation_observe_and_freeze(symmetric):
    lin = make_linear()
    ref = copy.deepcopy(lin)
    aq = IntQuantizer(8, symmetric, "per_tensor")
    fq = FakeQuantLinear(lin, IntQuantizer(4, False, "per_channel"), aq, act_static=True)
    # The max comes from the first batch, the min from the second, the last has neither.
    batches = [inputs(3, 32, seed=1) + 20, inputs(5, 32, seed=2) - 10, inputs(2, 32, seed=4) * 0.1]
    with pytest.raises(RuntimeError, match="before calibration"):
        fq(batches[0])
    fq.observing = True
    for x in batches:  # observing: activations pass through in float
        assert torch.equal(fq(x), F.linear(x, fq.fake_weight(), ref.bias))
    fq.finish_observing()
    assert not fq.observing
    both = torch.cat(batches)
    scale, zero = aq.calc_qparams(both)
    torch.testing.assert_close(fq.a_scale, scale, rtol=0, atol=0)
    torch.testing.assert_close(fq.a_zero, zero, rtol=0, atol=0)
    x3 = inputs(4, 32, seed=3) * 10  # beyond the observed range: clamped by the static range
    out = fq(x3)
    assert torch.equal(out, F.linear(aq.quant_dequant(x3, scale, zero), fq.fake_weight(), ref.bias))
    assert not torch.allclose(out, F.linear(aq.fake_quant(x3), fq.fake_weight(), ref.bias))
    assert "a8 per_tensor static" in repr(fq)
    # Buffers are not persistent.
    assert set(fq.state_dict()) == {"weight", "bias"}


def test_finish_observing_without_data_fails():
    fq = FakeQuantLinear(make_linear(), IntQuantizer(4, False, "per_channel"), IntQuantizer(8, True, "per_tensor"),
                         act_static=True)
    fq.observing = True
    with pytest.raises(RuntimeError, match="no activations"):
        fq.finish_observing()


@pytest.mark.parametrize("bit,symmetric", [(8, True), (8, False), (4, True)])
def test_dynamic_per_token_activation_error_is_bounded(bit, symmetric):
    lin = make_linear(64, 24)
    aq = IntQuantizer(bit, symmetric, "per_token")
    fq = FakeQuantLinear(lin, IntQuantizer(4, False, "per_group", 16), aq)
    x = inputs(2, 7, 64)
    x[0, 3] *= 50  # one outlier token only affects its own scale
    out = fq(x)
    weight_only = F.linear(x, fq.fake_weight(), lin.bias)
    assert torch.equal(out, F.linear(aq.fake_quant(x), fq.fake_weight(), lin.bias))
    scale, _ = aq.calc_qparams(x)
    # |W (x - qdq(x))| <= |W|_1 * max|x - qdq(x)| <= |W|_1 * scale / 2, per token and output.
    bound = (scale.reshape(2, 7, 1) / 2) * fq.fake_weight().abs().sum(dim=1) * (1 + 1e-4) + 1e-6
    diff = (out - weight_only).abs()
    assert torch.all(diff <= bound)
    assert diff.max() > 0
    # Tokens other than the outlier see much smaller errors than the outlier token.
    assert diff[0, 3].max() > diff[1].max()
