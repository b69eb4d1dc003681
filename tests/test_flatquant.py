"""FlatQuant: its merged transforms keep the float block's function, at W4A4 on a block with
outlier channels it beats RTN and SmoothQuant, training lowers the loss, it runs through the
runner (W4A4 and weight-only), a resume checkpoint restores its transforms, and exports and
bad configs are refused with one line. Its training step computes what the FakeQuantLinears with
the transform compute (loss and gradients), without host syncs and in fewer operators."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import build_tiny_model, tiny_config
from safetensors.torch import save_file
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from llmc import compress
from llmc.config import load_config
from llmc.errors import ConfigError
from llmc.methods import get_method, get_methods
from llmc.methods.flatquant import FlatQuant
from llmc.models import get_adapter
from llmc.pipeline import BlockwisePipeline, capture_block_inputs
from llmc.pipeline.blockwise import BlockContext, run_block
from llmc.pipeline.checkpoint import block_tensors, restore_block
from llmc.quant import FakeQuantLinear, quant_disabled
from llmc.quant.affine import KroneckerAffine, TrainedBlock, kron_factors, kron_matmul, training_step
from llmc.quant.fake_linear import PRUNED, set_input_transform

CPU = torch.device("cpu")
W4 = {"bit": 4, "symmetric": True, "granularity": "per_channel", "group_size": -1}
A4 = {"bit": 4, "symmetric": True, "granularity": "per_token"}
SAVE_FLAGS = ["save_trans", "save_fake", "save_vllm", "save_sgl", "save_autoawq", "save_gptq", "save_mlcllm"]


def _method(name: str = "FlatQuant", act: dict | None = A4, **special):
    quant = {"method": name, "weight": W4, "special": special}
    if act is not None:
        quant["act"] = act
    return get_method(load_config({"model": {"path": "unused"}, "quant": quant}).quant)


def _outlier_model(kind: str):
    """A tiny model whose norms blow up 4 channels 30x (activation outliers), and its calibration inputs."""
    model = build_tiny_model(kind, 384, seed=3)
    adapter = get_adapter("auto", model.config.model_type)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for block in adapter.get_blocks(model):
            for group in adapter.groups:
                norm = block.get_submodule(group.prev_op)
                if not isinstance(norm, torch.nn.Linear):
                    norm.weight[torch.randperm(norm.weight.numel(), generator=gen)[:4]] *= 30
    ids = torch.randint(3, 384, (8, 32), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": None} for i in range(0, 8, 2)]
    return model, adapter, capture_block_inputs(model, adapter, batches, CPU)


def _outlier_block(kind: str):
    """Block 0 of `_outlier_model`, with its calibration inputs and float outputs."""
    model, adapter, inputs = _outlier_model(kind)
    block = adapter.get_blocks(model)[0]
    with torch.no_grad():
        ref = run_block(block, inputs, CPU)
    return block, adapter, inputs, ref


def _process(method, block, adapter, inputs) -> torch.nn.Module:
    block = copy.deepcopy(block)
    ctx = BlockContext(0, block, adapter, inputs, CPU, adapter.block_linear_names(block))
    method.prepare_block(ctx)
    method.process_block(ctx)
    return block


@torch.no_grad()
def _rel_error(block, inputs, ref) -> float:
    out = run_block(block, inputs, CPU)
    return math.sqrt(sum(float((o - r).pow(2).sum()) for o, r in zip(out, ref))
                     / sum(float(r.pow(2).sum()) for r in ref))


def test_kronecker_factors_and_product():
    assert [kron_factors(n) for n in (576, 1536, 4096, 11008, 7)] == [(24, 24), (32, 48), (64, 64), (86, 128),
                                                                     (1, 7)]
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, generator=gen), torch.randn(5, 5, generator=gen)
    x = torch.randn(2, 4, 15, generator=gen)
    torch.testing.assert_close(kron_matmul(x, a, b), x @ torch.kron(a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direct_inv", [False, True])
def test_transform_and_merged_inverse_are_exact(direct_inv):
    gen = torch.Generator().manual_seed(1)
    t = KroneckerAffine(24, diag=torch.rand(24, generator=gen) + 0.5, direct_inv=direct_inv, generator=gen)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    w, x = torch.randn(10, 24, generator=gen), torch.randn(7, 24, generator=gen)
    torch.testing.assert_close(t(x) @ t.transform_weight(w).T, x @ w.T, rtol=1e-4, atol=1e-4)
    t.freeze()
    assert not list(t.parameters()) and {n for n, _ in t.named_buffers()} == {"left", "right", "scale"}
    torch.testing.assert_close(t(x) @ t.merge_weight(w).T, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_merged_block_equals_float_block(kind):
    block, adapter, inputs, ref = _outlier_block(kind)
    method = _method(epochs=3)
    done = _process(method, block, adapter, inputs)
    fqs = {n: m for n, m in done.named_modules() if isinstance(m, FakeQuantLinear)}
    assert len(fqs) == len(adapter.block_linear_names(block))
    transforms = [m.input_transform for m in fqs.values()]
    assert all(isinstance(t, KroneckerAffine) and t.is_frozen for t in transforms)
    qkv = [m.input_transform for n, m in fqs.items() if n in adapter.block_groups(block)[0].linears]
    assert len(qkv) == 3 and all(t is qkv[0] for t in qkv)  # one transform per group
    assert not any(p.requires_grad for n, p in done.named_parameters() if "act_clip" in n)
    assert all(m.weight_clip is None for m in fqs.values())
    with quant_disabled(done):
        assert _rel_error(done, inputs, ref) < 1e-4
    weights = {n: p for n, p in block.named_parameters()}
    changed = [n for n, p in done.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert len(changed) >= len(fqs)  # every weight holds its transform's inverse


def test_w4a4_beats_rtn_and_smoothquant_on_outliers():
    block, adapter, inputs, ref = _outlier_block("llama")
    rtn = _rel_error(_process(_method("RTN"), block, adapter, inputs), inputs, ref)
    sq = _rel_error(_process(_method("SmoothQuant", alpha=0.5), block, adapter, inputs), inputs, ref)
    method = _method(epochs=8)
    flat = _rel_error(_process(method, block, adapter, inputs), inputs, ref)
    assert flat < 0.6 * rtn and flat < sq, (flat, sq, rtn)
    losses = method.epoch_losses[0]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses  # training lowers the loss


def test_resume_checkpoint_restores_transforms(tmp_path):
    block, adapter, inputs, _ = _outlier_block("llama")
    method = _method(epochs=1)
    done = _process(method, block, adapter, inputs)
    tensors, meta = block_tensors(done)
    save_file(tensors, tmp_path / "block.safetensors", meta)
    fresh = copy.deepcopy(block)
    restore_block(tmp_path / "block.safetensors", fresh, _method(epochs=1).restore_linear)
    with torch.no_grad():
        for a, b in zip(run_block(done, inputs, CPU), run_block(fresh, inputs, CPU)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("act", [A4, None], ids=["w4a4", "w4"])
def test_runner_fake_quant_perplexity_is_finite(tiny_llama_dir, act):
    quant = {"method": "FlatQuant", "weight": W4, "special": {"epochs": 2}}
    if act is not None:
        quant["act"] = act
    cfg = tiny_config(tiny_llama_dir, quant=quant)
    cfg["eval"]["eval_pos"] = ["pretrain", "transformed", "fake_quant"]
    result = compress(cfg, progress=False)
    assert math.isfinite(result.ppl("fake_quant")) and result.ppl("fake_quant") > 1
    assert result.ppl("transformed") == pytest.approx(result.ppl("pretrain"), rel=1e-4)
    assert set(result.model.model.layers[0].mlp.down_proj.state_dict()) >= {"input_transform.left", "weight"}


@pytest.mark.parametrize("flag", SAVE_FLAGS)
def test_exports_are_refused_before_loading(tmp_path, flag):
    cfg = {"model": {"path": str(tmp_path / "no-model")}, "calib": {"name": "wikitext2"},
           "quant": {"method": "FlatQuant", "weight": W4, "act": A4},
           "save": {"save_path": str(tmp_path / "out"), flag: True}}
    with pytest.raises(ConfigError) as err:
        compress(cfg, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("FlatQuant's learned online transforms cannot be exported")
    assert f"save.{flag}" in message and "fake quantization" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("quant", "needle"), [
    ({"method": ["FlatQuant", "GPTQ"]}, "must be the quantizing"),
    ({"method": "FlatQuant", "act": {**A4, "granularity": "per_tensor", "static": True}}, "static: false"),
    ({"method": "FlatQuant", "weight": {**W4, "calib_algo": "learnable"}, "special": {"lwc": False}},
     "lwc: true"),
    ({"method": "FlatQuant", "special": {"epoch": 3}}, "epochs"),
    ({"method": "FlatQuant", "special": {"diag_init": "ones"}}, "sq_style"),
])
def test_bad_configs_are_one_line_errors(quant, needle):
    cfg = load_config({"model": {"path": "unused"}, "calib": {"name": "wikitext2"},
                       "quant": {"weight": W4, **quant}})
    with pytest.raises(ConfigError, match=needle) as err:
        get_methods(cfg.quant)
    assert "\n" not in str(err.value)


def test_keys_and_composition():
    method = _method(lr=1e-3, epochs=2)
    assert isinstance(method, FlatQuant) and method.special.flat_lr == 1e-3 and method.special.epochs == 2
    first, last = get_methods(load_config({"model": {"path": "unused"}, "quant": {
        "method": ["SmoothQuant", "FlatQuant"], "weight": W4, "act": A4}}).quant)
    assert not first.final and last.final and isinstance(last, FlatQuant)


def test_recording_in_the_pipeline_forward_saves_a_forward(monkeypatch):
    calls = []
    forward = BlockContext.forward
    monkeypatch.setattr(BlockContext, "forward", lambda ctx: calls.append(ctx.index) or forward(ctx))
    outputs = []
    for observe in (True, False):
        model, adapter, inputs = _outlier_model("llama")
        method = _method(epochs=1)

        def process(ctx, method=method):
            method.prepare_block(ctx)
            method.process_block(ctx)

        calls.clear()
        outputs.append(BlockwisePipeline(model, adapter, CPU, progress=False).run(
            inputs, process, targets=lambda i, a=adapter, m=model: a.block_linear_names(a.get_blocks(m)[i]),
            observe=method.observe if observe else None).hidden)
        assert calls == [0, 1, 2] if observe else [0, 0, 1, 1, 2, 2]
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pruned_weights_are_refused():
    block, adapter, inputs, _ = _outlier_block("llama")
    setattr(block.mlp.down_proj, PRUNED, True)
    with pytest.raises(ConfigError, match="mlp.down_proj dense"):
        _process(_method(epochs=1), block, adapter, inputs)


def test_options_without_diag_and_clipping():
    block, adapter, inputs, ref = _outlier_block("llama")
    rtn = _rel_error(_process(_method("RTN"), block, adapter, inputs), inputs, ref)
    method = _method(epochs=2, add_diag=False, lwc=False, lac=False, direct_inv=True, warmup=True)
    done = _process(method, block, adapter, inputs)
    fqs = [m for m in done.modules() if isinstance(m, FakeQuantLinear)]
    assert all(m.act_clip is None and m.weight_clip is None and m.input_transform.scale is None for m in fqs)
    assert _rel_error(done, inputs, ref) < rtn
    with quant_disabled(done):
        assert _rel_error(done, inputs, ref) < 1e-4


# ---- the training step: FakeQuantLinear's functions in fewer operators, without host syncs ------


class _InverseInWeight(torch.nn.Module):
    def __init__(self, transform: KroneckerAffine) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.transform.transform_weight(weight)


class _Ops(TorchDispatchMode):
    """Counts operators that launch work (not views) and those that wait for the device (host syncs)."""

    SYNCS = ("aten._local_scalar_dense", "aten._linalg_check_errors", "aten.nonzero", "aten.item")

    def __init__(self) -> None:
        super().__init__()
        self.count, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        if str(func).startswith(self.SYNCS):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def _step_both_ways(monkeypatch, kind: str, quant: dict, before: bool = False) -> dict:
    """One training step's loss gradients (trained parameters moved off their start), computed by the
    method's training step and by the FakeQuantLinears themselves with the weight parametrized by
    the transform, with the operators each runs."""
    result = {}

    def check(self, ctx, targets, groups):
        transforms = [t for t, _ in groups]
        linears = [fq for _, fqs in groups for fq in fqs]
        params = [p for t in transforms for p in t.parameters()]
        params += [p for fq in linears for c in (fq.weight_clip, fq.act_clip) if c is not None for p in c.parameters()]
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        hidden, args, kwargs = ctx.inputs.batch(1, ctx.device)

        def grads(run) -> tuple[torch.Tensor, list[torch.Tensor], _Ops]:
            with torch.enable_grad(), _Ops() as ops:
                out = run()
                out = out[0] if isinstance(out, tuple) else out
                loss = torch.nn.functional.mse_loss(out, targets[1])
                return loss.detach(), torch.autograd.grad(loss, params), ops

        def fast():
            with TrainedBlock(groups) as trained, training_step(transforms), trained.step():
                return ctx.block(hidden, *args, **kwargs)

        def reference():
            for t, fqs in groups:
                for fq in fqs:
                    parametrize.register_parametrization(fq, "weight", _InverseInWeight(t))
            try:
                with parametrize.cached():
                    return ctx.block(hidden, *args, **kwargs)
            finally:
                for fq in linears:
                    parametrize.remove_parametrizations(fq, "weight", leave_parametrized=False)

        result["fast"], result["reference"] = grads(fast), grads(reference)
        return []

    monkeypatch.setattr(FlatQuant, "_train", check)
    block, adapter, inputs, _ = _outlier_block(kind)
    if before:  # an earlier method's online transform (a random rotation) before down_proj
        rotation = torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(5)))[0]
        set_input_transform(block, "mlp.down_proj", _Rotation(rotation))
    _process(get_method(load_config({"model": {"path": "unused"}, "quant": {"method": "FlatQuant", **quant}}).quant),
             block, adapter, inputs)
    return result


class _Rotation(torch.nn.Module):
    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


@pytest.mark.parametrize(("kind", "quant", "before"), [
    ("llama", {"weight": W4, "act": A4}, False),
    ("opt", {"weight": W4, "act": A4}, False),
    ("llama", {"weight": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 16}}, True),
    ("llama", {"weight": {**W4, "granularity": "per_tensor"}, "act": {**A4, "granularity": "per_tensor",
                                                                         "symmetric": False},
               "special": {"direct_inv": True, "add_diag": False}}, False),
    ("llama", {"weight": W4, "act": A4, "special": {"lac": False, "lwc": False}}, True),
], ids=["w4a4-llama", "w4a4-opt", "asym-g16-w4-rotated-down", "per-tensor-direct", "no-clipping-rotated-down"])
def test_training_step_computes_what_the_fake_quant_linears_compute(monkeypatch, kind, quant, before):
    result = _step_both_ways(monkeypatch, kind, quant, before)
    (loss, grads, ops), (ref_loss, ref_grads, ref_ops) = result["fast"], result["reference"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert float((g - ref).norm()) <= 1e-3 * float(ref.norm()) + 1e-9, (g, ref)  # floating-point order only
    assert not ops.syncs, ops.syncs
    if kind == "llama" and quant == {"weight": W4, "act": A4}:  # the paper's setting: groups batched
        assert ops.count < 0.6 * ref_ops.count, (ops.count, ref_ops.count)


def test_step_matrices_are_each_transforms_own():
    gen = torch.Generator().manual_seed(2)
    transforms = [KroneckerAffine(n, generator=gen) for n in (24, 24, 40)]
    with torch.no_grad():
        for p in (p for t in transforms for p in t.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    own = [t._matrices(inverse=True) for t in transforms]
    with training_step(transforms):
        for t, expected in zip(transforms, own):
            for a, b in zip(t._matrices(inverse=True), expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    singular = KroneckerAffine(9, add_diag=False, direct_inv=True, generator=gen)
    with torch.no_grad():
        singular.factors[0].matrix.zero_()
    with training_step([singular]):  # no error raised (no host sync): the NaN reaches the loss check
        assert not torch.isfinite(singular.transform_weight(torch.ones(2, 9))).all()
