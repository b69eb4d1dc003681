"""GPTQ: beats RTN on the layer reconstruction loss, matches unblocked GPTQ, stores parameters
that reproduce its weights exactly, survives bad Hessians, and runs in the pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

import llmc
from llmc.config.schema import QuantSection
from llmc.errors import ConfigError, NumericsError
from llmc.methods.gptq import GPTQ, GroupIndexFakeQuantLinear, gptq_quantize, qdq_elementwise
from llmc.methods.hessian import group_hessians
from llmc.models.adapter import LinearGroup, ModelAdapter
from llmc.pipeline.blockwise import BlockContext
from llmc.pipeline.capture import BlockInputs
from llmc.quant import FakeQuantLinear
from llmc.quant.fake_linear import fake_quant_modules
from llmc.quant.quantizer import IntQuantizer

CPU = torch.device("cpu")


def correlated_inputs(tokens: int = 2048, features: int = 256, seed: int = 0) -> torch.Tensor:
    """Correlated features (Z @ A) with a few outlier channels, like LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=gen) @ (torch.randn(features, features, generator=gen) / features**0.5)
    x[:, [3, 77, 150, 201][: max(1, features // 64)]] *= 20
    return x


def layer(out: int = 256, features: int = 256, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = correlated_inputs(features=features, seed=seed)
    w = torch.randn(out, features, generator=torch.Generator().manual_seed(seed + 1)) / features**0.5
    return w, x, 2 / x.shape[0] * x.T @ x


def quantizer(bit: int = 4, group_size: int = -1, **kw) -> IntQuantizer:
    gran = "per_group" if group_size > 0 else "per_channel"
    return IntQuantizer(bit=bit, symmetric=False, granularity=gran, group_size=group_size, **kw)


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.norm((w - q) @ x.T).item()


def stored_qdq(result, q: IntQuantizer) -> torch.Tensor:
    """What a fake-quant layer computes from Q with the stored params (per-column groups via g_idx)."""
    rows = result.weight.shape[0]
    scale = result.scale.view(rows, -1)[:, result.g_idx] if q.granularity != "per_tensor" else result.scale
    zero = result.zero.view(rows, -1)[:, result.g_idx] if q.granularity != "per_tensor" else result.zero
    return qdq_elementwise(result.weight, scale, zero, q)


@pytest.mark.parametrize("bit", [4, 3])
@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("actorder", [False, True])
def test_beats_rtn_on_reconstruction(bit, group_size, actorder):
    w, x, h = layer()
    q = quantizer(bit, group_size)
    result = gptq_quantize(w, h, q, actorder=actorder)
    rtn = output_error(w, q.fake_quant(w), x)
    gptq = output_error(w, result.weight, x)
    assert gptq < (0.6 if actorder else 0.85) * rtn
    assert torch.equal(stored_qdq(result, q), result.weight)
    if not actorder:
        assert torch.equal(q.quant_dequant(result.weight, result.scale, result.zero), result.weight)


def test_matches_unblocked_reference():
    """Lazy batch updates change only the order of arithmetic, not the algorithm."""
    w, x, h = layer(out=64, features=96)
    q = quantizer(4)
    hd = h.double() + 0.01 * h.diag().mean().double() * torch.eye(96, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    scale, zero = (p.double().view(-1) for p in q.calc_qparams(w))
    ref, work = torch.zeros_like(w, dtype=torch.float64), w.double().clone()
    for j in range(96):
        ref[:, j] = qdq_elementwise(work[:, j], scale, zero, q)
        work[:, j:] -= torch.outer((work[:, j] - ref[:, j]) / hinv[j, j], hinv[j, j:])
    for blocksize in (1, 32, 128):
        got = gptq_quantize(w, h, q, blocksize=blocksize).weight
        assert (got == ref.float()).float().mean() > 0.99


@pytest.mark.parametrize("actorder,static_groups", [(False, False), (True, False), (True, True), (False, True)])
def test_partial_last_group(actorder, static_groups):
    w, x, h = layer(out=48, features=200)
    q = quantizer(4, 64, partial_group=True)
    result = gptq_quantize(w, h, q, blocksize=100, actorder=actorder, static_groups=static_groups)
    assert result.scale.shape == (48 * 4, 1) and result.g_idx.shape == (200,)
    assert torch.bincount(result.g_idx).tolist() == [64, 64, 64, 8]
    assert torch.equal(stored_qdq(result, q), result.weight)
    if not actorder or static_groups:
        assert torch.equal(result.g_idx, torch.arange(200) // 64)
        assert torch.equal(q.quant_dequant(result.weight, result.scale, result.zero), result.weight)
    assert output_error(w, result.weight, x) < output_error(w, q.fake_quant(w), x)


@pytest.mark.parametrize("kind", ["per_tensor", "mse"])
def test_other_ranges(kind):
    w, x, h = layer(out=32, features=64)
    if kind == "per_tensor":
        q = IntQuantizer(bit=4, symmetric=True, granularity="per_tensor")
    else:
        q = quantizer(3, calib_algo="mse")
    result = gptq_quantize(w, h, q, actorder=True)
    assert torch.equal(q.quant_dequant(result.weight, result.scale, result.zero), result.weight)
    assert output_error(w, result.weight, x) < output_error(w, q.fake_quant(w), x)


def test_dead_columns_and_indefinite_hessian():
    w, x, h = layer(out=32, features=64)
    x = x[:16]  # fewer tokens than features: H is singular
    x[:, [5, 40]] = 0
    h = 2 / 16 * x.T @ x
    shift = torch.full((64,), 5e-3 * h.diag().mean().item())
    shift[[5, 40]] = 0
    h -= torch.diag(shift)  # slightly indefinite, dead columns kept
    q = quantizer(4, 16)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h + 1e-4 * h.diag().mean() * torch.eye(64))
    result = gptq_quantize(w, h, q, percdamp=1e-4)  # succeeds once damping has grown to 1e-2
    assert torch.isfinite(result.weight).all()
    assert torch.equal(result.weight[:, [5, 40]], torch.zeros(32, 2))
    assert torch.equal(q.quant_dequant(result.weight, result.scale, result.zero), result.weight)


@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_hopeless_hessian_raises(bad):
    w = torch.randn(8, 16)
    h = -torch.eye(16) if bad == "negative" else torch.full((16, 16), float("nan"))
    with pytest.raises(NumericsError, match="not positive definite"):
        gptq_quantize(w, h, quantizer(4))


class ToyBlock(nn.Module):
    def __init__(self, features: int = 64, hidden: int = 128) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.up = nn.Linear(features, hidden)
        self.gate = nn.Linear(features, hidden)
        self.down = nn.Linear(hidden, features)
        with torch.no_grad():
            for lin in (self.up, self.gate, self.down):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / lin.in_features**0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) / lin.in_features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.gate(x)) * self.up(x))


TOY_ADAPTER = ModelAdapter(
    name="toy", model_types=(), blocks="layers", pre_block=(), head=(),
    groups=(LinearGroup("up", ("up", "gate"), None, ""), LinearGroup("down", ("down",), "up", "down")),
)


def toy_context(block: nn.Module, hidden: list[torch.Tensor], masks: list) -> BlockContext:
    inputs = BlockInputs(hidden, [()] * len(hidden), [{}] * len(hidden), masks)
    return BlockContext(0, block, TOY_ADAPTER, inputs, CPU, ["up", "gate", "down"])


def toy_inputs(dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list]:
    x = correlated_inputs(tokens=4 * 64, features=64, seed=5).reshape(4, 64, 64).to(dtype)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 40:] = False
    x[1, 40:] = 1e4  # padding garbage: must not reach the Hessian
    return [x[:2], x[2:]], [mask, None]


def gptq(special: dict | None = None, group_size: int = 32, final: bool = True) -> GPTQ:
    weight = {"bit": 3, "granularity": "per_group", "group_size": group_size}
    return GPTQ(QuantSection(method="GPTQ", weight=weight, special=special or {}), final=final)


def test_hessian_skips_padding():
    block, (hidden, masks) = ToyBlock(), toy_inputs()
    ctx = toy_context(block, hidden, masks)
    groups = [list(mods.items()) for _, mods in ctx.groups()]
    (h_up, _), _ = group_hessians(ctx, groups)
    real = torch.cat([hidden[0][masks[0]], hidden[1].reshape(-1, 64)])
    torch.testing.assert_close(h_up, 2 / real.shape[0] * real.T @ real)


@pytest.mark.parametrize("true_sequential", [True, False])
@pytest.mark.parametrize("actorder", [False, True])
def test_block_beats_rtn_and_stores_exact_params(true_sequential, actorder):
    errors, block = rtn_and_gptq_errors(lambda: gptq({"true_sequential": true_sequential, "actorder": actorder}))
    for _, fq in fake_quant_modules(block):
        assert torch.equal(fq.fake_weight(), fq.weight)
        assert fq.g_idx.shape == (fq.in_features,)
    assert isinstance(block.down, GroupIndexFakeQuantLinear) == actorder
    assert errors["gptq"] < 0.8 * errors["rtn"]


def rtn_and_gptq_errors(make_method) -> tuple[dict[str, float], nn.Module]:
    """A ToyBlock's output error on its calibration inputs (real tokens only) with every linear rounded to
    nearest ("rtn") and with the method's `process_block` ("gptq"), and the block GPTQ left."""
    hidden, masks = toy_inputs()
    hidden[0][1, 40:] = 0  # keep the error measurement on real tokens
    expected = [ToyBlock()(h) for h in hidden]
    errors = {}
    for name in ("rtn", "gptq"):
        block, method = ToyBlock(), make_method()
        ctx = toy_context(block, hidden, masks)
        if name == "rtn":
            for n in ctx.targets:
                method.wrap_linear(ctx, n)
        else:
            method.process_block(ctx)
        with torch.no_grad():
            errors[name] = sum(torch.linalg.norm(block(h) - e).item() for h, e in zip(hidden, expected))
    return errors, block


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_block(dtype):
    hidden, masks = toy_inputs(dtype)
    block = ToyBlock().to(dtype)
    gptq({"actorder": True}).process_block(toy_context(block, hidden, masks))
    for _, fq in fake_quant_modules(block):
        assert fq.weight.dtype == dtype
        assert torch.equal(fq.fake_weight(), fq.weight)


def test_not_final_writes_q_in_float():
    hidden, masks = toy_inputs()
    block = ToyBlock()
    before = block.down.weight.clone()
    gptq(final=False).process_block(toy_context(block, hidden, masks))
    assert not fake_quant_modules(block)
    assert not torch.equal(block.down.weight, before)
    assert len(torch.unique(block.down.weight[0, :32])) <= 2**3


@pytest.mark.parametrize(
    "model,special",
    [
        ("llama", {"true_sequential": True}),
        ("llama", {"true_sequential": False, "actorder": True}),
        ("opt", {"true_sequential": True, "actorder": True, "static_groups": True}),
        ("opt", {"true_sequential": False}),
    ],
)
def test_pipeline(model, special, tiny_llama_dir, tiny_opt_dir):
    folder = {"llama": tiny_llama_dir, "opt": tiny_opt_dir}[model]
    weight = {"bit": 4, "granularity": "per_group", "group_size": 32}
    result = llmc.compress(tiny_config(folder, quant={"method": "GPTQ", "weight": weight, "special": special}),
                           progress=False)
    assert math.isfinite(result.ppl("fake_quant"))
    layers = fake_quant_modules(result.model)
    assert len(layers) == 3 * (7 if model == "llama" else 6)
    for _, fq in layers:
        assert torch.equal(fq.fake_weight(), fq.weight)
    dynamic_actorder = special.get("actorder", False) and not special.get("static_groups", False)
    assert any(isinstance(fq, GroupIndexFakeQuantLinear) for _, fq in layers) == dynamic_actorder


@pytest.mark.parametrize("model", ["llama", "opt"])
def test_replaying_finished_children_changes_nothing(model, tiny_llama_dir, tiny_opt_dir, monkeypatch):
    """True-sequential passes that replay the recorded attention output give the very weights that
    re-running it gives."""
    folder = {"llama": tiny_llama_dir, "opt": tiny_opt_dir}[model]
    weight = {"bit": 3, "granularity": "per_group", "group_size": 32}
    from llmc.pipeline import BlockContext

    replayed: list[str] = []
    original = BlockContext.forward_until

    def spy(self, name, **kwargs):
        replayed.extend(kwargs.get("replay") or {})
        return original(self, name, **kwargs)

    monkeypatch.setattr(BlockContext, "forward_until", spy)
    weights = {}
    for replay in (True, False):
        monkeypatch.setattr(GPTQ, "replay_children", replay)
        result = llmc.compress(tiny_config(folder, quant={"method": "GPTQ", "weight": weight}), progress=False)
        weights[replay] = {n: fq.weight.clone() for n, fq in fake_quant_modules(result.model)}
        assert bool(replayed) is replay and set(replayed) <= {"self_attn"}
        replayed.clear()
    assert weights[True].keys() == weights[False].keys()
    for name, w in weights[True].items():
        assert torch.equal(w, weights[False][name]), name


def test_quantized_block_forward_replays_attention_when_weight_only(tiny_llama_dir, monkeypatch):
    """The pipeline's forward of the GPTQ block replays attention (recorded in the passes) and the MLP
    through its last linear, whose inputs the last pass kept (weight-only); with activation quantization the wrapped block computes
    otherwise, so nothing is."""
    from llmc.pipeline import BlockContext
    from llmc.pipeline.context import LinearReplay

    seen: list[set[str]] = []
    original = BlockContext.forward

    def spy(self):
        seen.append(set(self.frozen))
        if self.frozen:  # attention recorded in the gate/up pass, the MLP replayed through down_proj
            assert isinstance(self.frozen["self_attn"], list) and isinstance(self.frozen["mlp"], LinearReplay)
        return original(self)

    monkeypatch.setattr(BlockContext, "forward", spy)
    weight = {"bit": 4, "granularity": "per_group", "group_size": 32}
    llmc.compress(tiny_config(tiny_llama_dir, quant={"method": "GPTQ", "weight": weight}), progress=False)
    assert seen and all(s == {"self_attn", "mlp"} for s in seen)
    seen.clear()
    act = {"bit": 8, "symmetric": True, "granularity": "per_token"}
    llmc.compress(tiny_config(tiny_llama_dir, quant={"method": "GPTQ", "weight": weight, "act": act}), progress=False)
    assert seen and not any(seen)


def test_composition(tiny_llama_dir):
    weight = {"bit": 4, "granularity": "per_channel"}
    result = llmc.compress(tiny_config(tiny_llama_dir, quant={"method": ["GPTQ"], "weight": weight}), progress=False)
    assert math.isfinite(result.ppl("fake_quant"))
    quant = {"method": ["GPTQ", "RTN"], "weight": weight, "special": {"GPTQ": {"percdamp": 0.05}}}
    result = llmc.compress(tiny_config(tiny_llama_dir, quant=quant), progress=False)
    assert math.isfinite(result.ppl("fake_quant"))
    assert all(type(fq) is FakeQuantLinear for _, fq in fake_quant_modules(result.model))


@pytest.mark.parametrize("special", [{"percdmp": 0.01}, {"percdamp": 0}, {"blocksize": 0}])
def test_bad_special_is_config_error(special, tiny_llama_dir):
    with pytest.raises(ConfigError, match="GPTQ: .*quant.special"):
        llmc.compress(tiny_config(tiny_llama_dir, quant={"method": "GPTQ", "special": special}), progress=False)


@pytest.mark.parametrize("actorder", [False, True])
def test_consuming_the_hessian_gives_the_same_result_and_copying_keeps_it(actorder):
    w, _, h = layer()
    original = h.clone()
    copied = gptq_quantize(w, h, quantizer(4, 64), actorder=actorder)
    assert torch.equal(h, original)  # the default leaves the caller's Hessian alone
    consumed = gptq_quantize(w, h, quantizer(4, 64), actorder=actorder, consume_hessian=True)
    assert torch.equal(consumed.weight, copied.weight)
    # Damped in place, no second [in, in] (act-order permutes into a copy, which it damps).
    assert torch.equal(h, original) is actorder


def test_inverse_hessian_factor_matches_the_reference_formula():
    """One Cholesky of the reversed H and a triangular solve give the reference code's factor
    (Cholesky, cholesky_inverse, upper Cholesky) of H damped the same way; H itself is used up."""
    from llmc.methods.gptq import inverse_hessian_cholesky

    _, x, _ = layer(out=8, features=96)
    h = 2 / x.shape[0] * x.T @ x
    reference = h.clone()
    reference.diagonal().add_(0.01 * reference.diagonal().mean())
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(reference)), upper=True)
    upper = inverse_hessian_cholesky(h, 0.01)
    assert torch.equal(upper, torch.triu(upper)) and (upper.diagonal() > 0).all()
    torch.testing.assert_close(upper, expected, rtol=1e-4, atol=1e-5)


class LiveBytes:
    """Bytes of tensor storage that ops create inside the context, alive now and at most (CPU)."""

    def __init__(self) -> None:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live = self.peak = 0
        keys: set[int] = set()

        def free(key: int, size: int) -> None:
            keys.discard(key)
            tracker.live -= size

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in keys:
                        storage = t.untyped_storage()
                        keys.add(storage.data_ptr())
                        tracker.live += storage.nbytes()
                        tracker.peak = max(tracker.peak, tracker.live)
                        weakref.finalize(storage, free, storage.data_ptr(), storage.nbytes())
                return out

        self.mode = Mode()

    def __enter__(self) -> LiveBytes:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def test_inverse_hessian_factor_holds_two_matrices_at_most():
    """Beside the H it uses up, the factorization keeps at most two more [in, in] matrices alive (the
    factor, then the flipped copy of the inverse): 4.75 before the identity reused H's storage and the
    finiteness checks stopped making copies (0.8 GiB more at a 7B down_proj's peak on an H200)."""
    from llmc.methods.hessian import inverse_hessian_cholesky

    _, x, _ = layer(out=8, features=256)
    h = 2 / x.shape[0] * x.T @ x
    with LiveBytes() as tracked:
        upper = inverse_hessian_cholesky(h, 0.01)
    matrix = h.numel() * 4
    assert tracked.peak <= 2 * matrix + 4096, tracked.peak / matrix
    assert upper.shape == h.shape


def test_memory_plan_counts_the_kept_linear_inputs():
    """The plan holds, per calibration token, the inputs the passes keep to replay attention (o_proj's)
    and, for the forward of the quantized block, the MLP (down_proj's), beside the solve's work and only
    with the activation cache on the device (the planner adds `replay_device_bytes` then)."""
    from conftest import build_tiny_model

    from llmc.models import get_adapter

    model = build_tiny_model("llama", 384)
    adapter = get_adapter("auto", "llama")
    block = adapter.get_blocks(model)[0]
    o_in, down_in = block.self_attn.o_proj.in_features, block.mlp.down_proj.in_features
    tokens, elem = 10_000, next(model.parameters()).element_size()
    weight = {"bit": 4, "granularity": "per_group", "group_size": 32}
    replaying = GPTQ(QuantSection(method="GPTQ", weight=weight))
    plain = GPTQ(QuantSection(method="GPTQ", weight=weight))
    plain.replay_children = False
    assert replaying.replay_device_bytes(model, adapter, tokens) == tokens * elem * (o_in + down_in)
    assert plain.replay_device_bytes(model, adapter, tokens) == 0
    assert replaying.extra_device_bytes(model, adapter, tokens) == plain.extra_device_bytes(model, adapter, tokens)
