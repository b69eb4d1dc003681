"""Outlier columns kept in float (llmc/quant/outliers.py) and the methods built on them: LLM.int8()
(llm_int8.py), QUIK (quik.py), OWQ (owq.py). Known outlier features or weak columns are injected into a
toy block; each method must keep exactly those columns in float and quantize the rest."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file
from torch import nn

from llmc import compress, load_config
from llmc.errors import ConfigError
from llmc.models.adapter import LinearGroup, ModelAdapter
from llmc.pipeline.blockwise import BlockContext, run_block
from llmc.pipeline.capture import BlockInputs
from llmc.pipeline.checkpoint import block_tensors, restore_block
from llmc.quant.fake_linear import fake_quant_modules
from llmc.quant.outliers import OutlierColumnLinear
from llmc.quant.quantizer import IntQuantizer
from llmc.schedule import build_methods

CPU = torch.device("cpu")
FEATURES, HIDDEN = 64, 96
OUTLIERS = [5, 21, 40, 58]


class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.up, self.gate, self.down = nn.Linear(FEATURES, HIDDEN), nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, FEATURES)
        with torch.no_grad():
            for lin in (self.up, self.gate, self.down):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / lin.in_features**0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.gate(x)) * self.up(x))


TOY = ModelAdapter(
    name="toy", model_types=(), blocks="layers", pre_block=(), head=(),
    groups=(LinearGroup("up", ("up", "gate"), None, ""), LinearGroup("down", ("down",), "up", "down")),
)


def toy_inputs() -> list[torch.Tensor]:
    """Activations of magnitude < 3 with large features OUTLIERS (|x| up to ~20, systematic as in LLMs)."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 32, FEATURES, generator=gen) * 0.5).clamp(-2.9, 2.9)
    x[..., OUTLIERS] = 12.0 + 8.0 * torch.rand(4, 32, len(OUTLIERS), generator=gen)
    return [x[:2], x[2:]]


def method(name: str, weight: dict, act: dict | None = None, **special):
    quant = {"method": name, "weight": weight, "special": special}
    if act is not None:
        quant["act"] = act
    return build_methods(load_config({"model": {"path": "/x"}, "quant": quant}))[0]


W4 = {"bit": 4, "symmetric": True, "granularity": "per_channel"}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
A4 = {"bit": 4, "symmetric": True, "granularity": "per_token"}
A8 = {"bit": 8, "symmetric": True, "granularity": "per_token"}


def run(m, hidden: list[torch.Tensor]) -> ToyBlock:
    block = ToyBlock()
    inputs = BlockInputs(hidden, [()] * len(hidden), [{}] * len(hidden), [None] * len(hidden))
    m.process_block(BlockContext(0, block, TOY, inputs, CPU, ["up", "gate", "down"]))
    return block


def one_line(exc) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------- the layer


def test_layer_keeps_columns_float_and_quantizes_the_rest():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    wq, aq = IntQuantizer(bit=4, symmetric=True, granularity="per_channel"), \
        IntQuantizer(bit=4, symmetric=True, granularity="per_token")
    fq = OutlierColumnLinear(linear, wq, aq)
    with torch.no_grad():
        fq.weight[:, 7] *= 50  # would spoil every row's range if it were quantized
    fq.set_outliers(torch.tensor([7, 30]))
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[7, 30]] = True
    with torch.no_grad():
        w = fq.fake_weight()
        assert torch.equal(w[:, mask], fq.weight[:, mask])  # bit for bit
        rest = wq.fake_quant(fq.weight.masked_fill(mask, 0))  # the rest on the grid of the other columns
        assert torch.equal(w[:, ~mask], rest[:, ~mask])
        assert not torch.equal(w[:, ~mask], fq.weight[:, ~mask])
        x = torch.randn(3, 5, 64)
        x[..., 7] = 40.0
        xq = fq.quantize_input(x)
        assert torch.equal(xq[..., mask], x[..., mask])
        assert torch.equal(xq[..., ~mask], aq.fake_quant(x.masked_fill(mask, 0))[..., ~mask])
        assert torch.equal(fq(x), nn.functional.linear(xq, w, fq.bias))


def resumed(m, tmp_path):
    """A block the method processed, and a fresh one restored from its per-block checkpoint."""
    done = run(m, toy_inputs())
    tensors, meta = block_tensors(done)
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    fresh = ToyBlock()
    restore_block(tmp_path / "b.safetensors", fresh, m.restore_linear)
    return done, fresh


def test_resume_restores_the_outlier_columns(tmp_path):
    done, fresh = resumed(method("QUIK", W4, A4, fp_features=4), tmp_path)
    for name in ("up", "gate", "down"):
        a, b = done.get_submodule(name), fresh.get_submodule(name)
        assert type(b) is OutlierColumnLinear and torch.equal(a.outlier_idx, b.outlier_idx)
        with torch.no_grad():
            assert torch.equal(a.fake_weight(), b.fake_weight())


# ---------------------------------------------------------------- the methods' choices


def test_llm_int8_keeps_the_features_over_the_threshold():
    hidden = toy_inputs()
    block = run(method("LlmInt8", W8, A8, threshold=6.0), hidden)
    for name in ("up", "gate"):
        assert block.get_submodule(name).outlier_idx.tolist() == OUTLIERS
    # down's input: the features of (relu(gate x) * up x) reaching 6 somewhere, recomputed here
    ref = ToyBlock()
    with torch.no_grad():
        inner = torch.cat([(torch.relu(ref.gate(h)) * ref.up(h)).reshape(-1, HIDDEN) for h in hidden])
    expected = (inner.abs().amax(0) >= 6.0).nonzero().flatten().tolist()
    assert block.down.outlier_idx.tolist() == expected and 0 < len(expected) < HIDDEN
    assert run(method("LlmInt8", W8, A8, threshold=100.0), hidden).up.outlier_idx.numel() == 0


def test_quik_keeps_the_largest_features():
    hidden = toy_inputs()
    block = run(method("QUIK", W4, A4, fp_features=4), hidden)
    assert block.up.outlier_idx.tolist() == OUTLIERS and block.gate.outlier_idx.tolist() == OUTLIERS
    assert block.down.outlier_idx.numel() == 4
    relative = run(method("QUIK", W4, A4, fp_features=4, fp_relative=True), hidden)
    assert relative.up.outlier_idx.tolist() == OUTLIERS and relative.down.outlier_idx.numel() == 6  # 4 * 96 / 64


def test_owq_keeps_the_most_sensitive_columns():
    hidden = [h.clone() for h in toy_inputs()]
    for h in hidden:
        h[..., OUTLIERS] = torch.randn(h[..., OUTLIERS].shape, generator=torch.Generator().manual_seed(1)) * 0.5
        h[..., 11] *= 30  # large H_jj
    ref = ToyBlock()
    with torch.no_grad():
        ref.up.weight[:, 33] *= 8  # a large weight column: large quantization error of the rows
    w3 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16}
    m = method("OWQ", w3, n_outlier=3, gptq=False)
    block = ToyBlock()
    block.load_state_dict(ref.state_dict())
    inputs = BlockInputs(hidden, [()] * 2, [{}] * 2, [None] * 2)
    m.process_block(BlockContext(0, block, TOY, inputs, CPU, ["up", "gate", "down"]))
    x = torch.cat([h.reshape(-1, FEATURES) for h in hidden])
    lam = 2 * x.pow(2).mean(0)
    wq = m.weight_quantizer
    score = lam * (ref.up.weight - wq.fake_quant(ref.up.weight.detach())).pow(2).sum(0)
    expected = score.topk(3).indices.sort().values
    assert torch.equal(block.up.outlier_idx, expected) and 11 in expected.tolist()
    with torch.no_grad():
        w = block.up.fake_weight()
        mask = torch.zeros(FEATURES, dtype=torch.bool)
        mask[expected] = True
        assert torch.equal(w[:, mask], ref.up.weight[:, mask])
        assert torch.equal(w[:, ~mask], wq.fake_quant(ref.up.weight.masked_fill(mask, 0))[:, ~mask])
    assert method("OWQ", w3, target_bit=4.3).columns(FEATURES) == 6  # (4.3 - 3) * 64 / (16 - 3) = 6.4


@pytest.mark.parametrize("name,weight,act,special", [
    ("LlmInt8", W8, A8, {}),
    ("QUIK", W4, A4, {"fp_features": 4}),
    ("OWQ", {"bit": 3, "symmetric": True, "granularity": "per_channel"}, None, {"n_outlier": 4}),
])
def test_block_error_below_rtn(name, weight, act, special):
    hidden = toy_inputs()
    ref = ToyBlock()
    expected = run_block(ref, BlockInputs(hidden, [()] * 2, [{}] * 2, [None] * 2), CPU)
    errors = {}
    for which in (name, "RTN"):
        m = method(which, weight, act, **(special if which == name else {}))
        block = run(m, hidden)
        with torch.no_grad():
            out = run_block(block, BlockInputs(hidden, [()] * 2, [{}] * 2, [None] * 2), CPU)
        errors[which] = sum((o - e).pow(2).sum().item() for o, e in zip(out, expected))
    assert errors[name] < 0.5 * errors["RTN"], errors


# ---------------------------------------------------------------- runs, exports, keys


@pytest.mark.parametrize("quant", [
    {"method": "LlmInt8", "weight": W8, "act": A8, "special": {"threshold": 1.5}},
    {"method": "QUIK", "weight": W4, "act": A4, "special": {"fp_features": 8}},
    {"method": "OWQ", "weight": {"bit": 4, "group_size": 32}, "special": {"n_outlier": 4}},
], ids=["LlmInt8", "QUIK", "OWQ"])
def test_full_run(tiny_llama_dir, tmp_path, quant):
    weight_only = "act" not in quant
    save = {"save_fake": True, "save_path": str(tmp_path / "out")} if weight_only else {}
    cfg = tiny_config(tiny_llama_dir, quant=quant, save=save)
    cfg["eval"]["max_windows"] = 1
    result = compress(load_config(cfg), progress=False)
    modules = fake_quant_modules(result.model)
    assert len(modules) == 3 * 7 and all(type(m) is OutlierColumnLinear for _, m in modules)
    assert result.ppl("fake_quant") > 0
    counts = [m.outlier_idx.numel() for _, m in modules]
    if quant["method"] == "LlmInt8":  # the tiny model's activations: a few features reach 1.5
        assert 0 < sum(counts) < sum(m.in_features for _, m in modules)
    else:
        want = quant["special"].get("fp_features", quant["special"].get("n_outlier"))
        assert counts == [want] * len(modules)
    if weight_only:  # the dense fake weights are the model exactly
        from transformers import AutoModelForCausalLM

        ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "fake_quant_model", dtype=torch.float32)
        with torch.no_grad():
            assert torch.allclose(saved.eval()(ids).logits, result.model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("name,act,flag,words", [
    ("QUIK", A4, "save_vllm", "vLLM (compressed-tensors) (save_vllm) cannot store"),
    ("LlmInt8", A8, "save_fake", "remove save.save_fake"),
    ("OWQ", None, "save_gptq", "GPTQ (save_gptq) cannot store"),
    ("OWQ", None, "save_autoawq", "AutoAWQ (save_autoawq) cannot store"),
])
def test_exports_refused_before_loading(tiny_llama_dir, tmp_path, monkeypatch, name, act, flag, words):
    import llmc.runner

    monkeypatch.setattr(llmc.runner, "load_model", lambda *_a, **_k: pytest.fail("the model was loaded"))
    quant = {"method": name, "weight": W8}
    if act:
        quant["act"] = act
    cfg = tiny_config(tiny_llama_dir, quant=quant, save={flag: True, "save_path": str(tmp_path / "o")})
    with pytest.raises(ConfigError) as exc:
        compress(load_config(cfg), progress=False)
    assert words in one_line(exc) and one_line(exc).startswith(name)
    assert not (tmp_path / "o").exists()


def test_weight_only_save_fake_allowed():
    assert method("OWQ", W4).export_refusal(["save_fake", "save_trans"]) is None
    assert method("QUIK", W4, A4).export_refusal(["save_trans"]) is None


@pytest.mark.parametrize("name,special,words", [
    ("LlmInt8", {"treshold": 6.0}, "quant.special.treshold"),
    ("LlmInt8", {"threshold": -1}, "threshold"),
    ("QUIK", {"fp_features": -2}, "fp_features"),
    ("QUIK", {"int8_down_proj": True}, "int8_down_proj"),
    ("OWQ", {"n_outs": 3}, "n_outs"),
    ("OWQ", {"n_outlier": 3, "target_bit": 4.1}, "not both"),
    ("OWQ", {"target_bit": 3.5}, "target_bit"),
    ("OWQ", {"percdamp": 0}, "percdamp"),
    ("QUIK", {"gptq": "maybe"}, "gptq"),
])
def test_bad_keys_one_line(name, special, words):
    with pytest.raises(ConfigError) as exc:
        method(name, W4, None, **special)
    assert words in one_line(exc)


def test_not_last_of_a_composition():
    cfg = {"model": {"path": "/x"}, "quant": {"method": ["OWQ", "GPTQ"], "weight": W4}}
    with pytest.raises(ConfigError, match="OWQ quantizes the weights") as exc:
        build_methods(load_config(cfg))
    one_line(exc)


# ---------------------------------------------------------------- GPTQ on the quantized columns

W3G = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16}
GPTQ_CASES = [
    ("QUIK", W4, A4, {"fp_features": 4}),
    ("OWQ", {"bit": 3, "symmetric": True, "granularity": "per_channel"}, None, {"n_outlier": 4}),
    ("OWQ", W3G, None, {"n_outlier": 5}),
    ("OWQ", W3G, None, {"n_outlier": 5, "actorder": True}),
]
GPTQ_IDS = ["QUIK-per_channel", "OWQ-per_channel", "OWQ-per_group", "OWQ-per_group-actorder"]


def block_error(block: nn.Module, hidden: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    with torch.no_grad():
        out = run_block(block, BlockInputs(hidden, [()] * 2, [{}] * 2, [None] * 2), CPU)
    return sum((o - e).pow(2).sum().item() for o, e in zip(out, expected))


@pytest.mark.parametrize("name,weight,act,special", GPTQ_CASES, ids=GPTQ_IDS)
def test_gptq_float_columns_exact_rest_on_the_grid(name, weight, act, special):
    ref, block = ToyBlock(), run(method(name, weight, act, **special), toy_inputs())
    wq = IntQuantizer(**weight)
    for lin in ("up", "gate", "down"):
        fq, orig = block.get_submodule(lin), ref.get_submodule(lin).weight
        mask = torch.zeros(fq.in_features, dtype=torch.bool)
        mask[fq.outlier_idx] = True
        assert type(fq) is OutlierColumnLinear and mask.sum() == special.get("fp_features", special.get("n_outlier"))
        with torch.no_grad():
            w = fq.fake_weight()
        assert torch.equal(w[:, mask], orig[:, mask])  # bit for bit
        assert torch.equal(w[:, ~mask], fq.weight[:, ~mask])  # GPTQ's Q, reproduced by the layer's params
        assert not torch.equal(w[:, ~mask], wq.fake_quant(orig.masked_fill(mask, 0))[:, ~mask])  # not RTN
        # on the grid: each row (group) of the rest takes at most 2^bit values
        g_idx = getattr(fq, "g_idx", None)
        groups = g_idx[~mask] if g_idx is not None else torch.zeros(int((~mask).sum()), dtype=torch.long)
        assert (g_idx is not None) == (wq.granularity == "per_group")
        if special.get("actorder"):
            assert not torch.equal(groups, groups.sort().values)  # act-order groups, not contiguous
        rest = w[:, ~mask]
        for g in groups.unique():
            for row in rest[:, groups == g]:
                assert row.unique().numel() <= 2 ** weight["bit"]


@pytest.mark.parametrize("name,weight,act,special", GPTQ_CASES, ids=GPTQ_IDS)
def test_gptq_block_error_below_rounding(name, weight, act, special):
    hidden = toy_inputs()
    expected = run_block(ToyBlock(), BlockInputs(hidden, [()] * 2, [{}] * 2, [None] * 2), CPU)
    with_gptq = block_error(run(method(name, weight, act, **special), hidden), hidden, expected)
    rounded = block_error(run(method(name, weight, act, **special, gptq=False), hidden), hidden, expected)
    assert with_gptq < 0.9 * rounded, (with_gptq, rounded)


def test_gptq_first_group_is_gptq_of_the_rest_columns():
    from llmc.methods.gptq import gptq_quantize

    hidden = toy_inputs()
    block = run(method("OWQ", W3G, n_outlier=5), hidden)
    x = torch.cat([h.reshape(-1, FEATURES) for h in hidden])
    hessian = 2 / x.shape[0] * x.T @ x
    rest = torch.ones(FEATURES, dtype=torch.bool)
    rest[block.up.outlier_idx] = False
    res = gptq_quantize(ToyBlock().up.weight[:, rest], hessian[rest][:, rest], IntQuantizer(**W3G))
    assert (res.weight - block.up.weight[:, rest]).abs().max() < 1e-4


def test_resume_restores_gptq_groups(tmp_path):
    done, fresh = resumed(method("OWQ", W3G, n_outlier=5, actorder=True), tmp_path)
    for name in ("up", "gate", "down"):
        a, b = done.get_submodule(name), fresh.get_submodule(name)
        assert type(b) is OutlierColumnLinear and torch.equal(a.g_idx, b.g_idx)
        with torch.no_grad():
            assert torch.equal(a.fake_weight(), b.fake_weight())
            assert not torch.equal(b.fake_weight(), ToyBlock().get_submodule(name).weight)
