"""Mixed precision (llmc/quant/schemes.py): `quant.overrides` land on the linears they name (by regex,
role, blocks; do_quant: false stays nn.Linear) with RTN, GPTQ and AWQ, each linear's fake weight is on
its own scheme's grid, `quant.auto_scheme` meets its bits-per-weight budget and gives an injected
sensitive linear more bits, a full `compress` run, and the one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model, tiny_config
from torch import nn

from llmc import compress
from llmc.config import load_config
from llmc.errors import ConfigError
from llmc.models import get_adapter
from llmc.quant import FakeQuantLinear
from llmc.quant.registry import build_quantizer
from llmc.quant.schemes import assign_bits
from llmc.schedule import build_methods, check_methods, compress_batches

CPU = torch.device("cpu")
VOCAB = 384
OVERRIDES = [
    {"regex": r"mlp\.down_proj", "weight": {"bit": 8}},
    {"role": "attn_in", "blocks": [1], "weight": {"bit": 3, "group_size": 16}},
    {"regex": r"model\.layers\.2\.self_attn\.o_proj", "do_quant": False},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(method="RTN", overrides=None, auto=None, **weight):
    quant = {"method": method, "weight": {"bit": 4, "group_size": 32, **weight}}
    if overrides is not None:
        quant["overrides"] = overrides
    if auto is not None:
        quant["auto_scheme"] = auto
    if method == "AWQ":
        quant["special"] = {"n_grid": 4}
    return load_config({"base": {"seed": 0, "device": "cpu"}, "model": {"path": "unused"}, "quant": quant})


def _batches(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 32), generator=gen)
    return [{"input_ids": ids[:2], "attention_mask": None}, {"input_ids": ids[2:], "attention_mask": None}]


def _run(cfg, model=None):
    model = model if model is not None else build_tiny_model("llama", VOCAB)
    adapter = get_adapter("auto", model.config.model_type)
    methods = build_methods(cfg)
    check_methods(cfg, methods, model, adapter)
    pipeline = compress_batches(cfg, model, adapter, methods, CPU, _batches(), progress=False)
    return model, pipeline


def _expected_bits(i: int, name: str) -> tuple[int, int] | None:
    if name == "self_attn.o_proj" and i == 2:
        return None
    if name == "mlp.down_proj":
        return 8, 32
    if i == 1 and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return 3, 16
    return 4, 32


NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _on_own_grid(fq: FakeQuantLinear) -> None:
    """The fake weight's codes under the linear's own params are integers in its own range."""
    q = fq.weight_quantizer
    rows = q.rows(fq.fake_weight().detach().float())
    codes = rows / fq.w_scale.float() + fq.w_zero.float()
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() == q.qmin and codes.round().max() == q.qmax  # the whole grid of its own bits
    assert rows.shape[0] == fq.out_features * (fq.in_features // q.group_size)


@pytest.mark.parametrize("method", ["RTN", "GPTQ", "AWQ"])
def test_overrides_land_on_named_modules(method):
    model, _ = _run(_cfg(method, OVERRIDES))
    for i, block in enumerate(model.model.layers):
        for name in NAMES:
            module = block.get_submodule(name)
            expected = _expected_bits(i, name)
            if expected is None:
                assert type(module) is nn.Linear, (i, name)
                continue
            assert isinstance(module, FakeQuantLinear), (i, name)
            assert (module.weight_quantizer.bit, module.weight_quantizer.group_size) == expected, (i, name)
            _on_own_grid(module)


def test_rtn_fake_weights_equal_each_modules_scheme():
    original = build_tiny_model("llama", VOCAB)
    model, _ = _run(_cfg("RTN", OVERRIDES), copy.deepcopy(original))
    for i, block in enumerate(model.model.layers):
        for name in NAMES:
            expected = _expected_bits(i, name)
            w = original.model.layers[i].get_submodule(name).weight
            if expected is None:
                assert torch.equal(block.get_submodule(name).weight, w)
                continue
            cfg = _cfg("RTN", bit=expected[0], group_size=expected[1])
            reference = build_quantizer(cfg.quant.weight, "weight").fake_quant(w)
            assert torch.equal(block.get_submodule(name).fake_weight(), reference), (i, name)


def test_assign_bits_meets_budget_and_prefers_sensitive():
    params = {"a": 100, "b": 100, "c": 200}
    errors = {"a": {"3": 10.0, "4": 1.0}, "b": {"3": 1.0, "4": 0.9}, "c": {"3": 50.0, "4": 5.0}}
    chosen = assign_bits(params, errors, [3, 4], 3.5)
    assert chosen == {"a": 3, "b": 3, "c": 4}  # c: largest error drop per bit, exactly at budget
    chosen = assign_bits(params, errors, [3, 4], 3.75)
    assert chosen == {"a": 4, "b": 3, "c": 4}
    assert assign_bits(params, errors, [2, 3, 4], 2.0) == dict.fromkeys(params, 2)


def test_auto_scheme_meets_budget_and_gives_sensitive_layer_more_bits():
    model = build_tiny_model("llama", VOCAB)
    with torch.no_grad():  # a sensitive linear: large weights, so its RTN output error dwarfs the others'
        model.model.layers[1].mlp.up_proj.weight.mul_(20)
    cfg = _cfg("GPTQ", overrides=[{"regex": r"model\.layers\.0\.mlp\.down_proj", "weight": {"bit": 8}}],
               auto={"bits_per_weight": 3.5, "bits": [3, 4]})
    model, pipeline = _run(cfg, model)
    mp = pipeline.results["mixed_precision"]
    bits, params = mp["bits"], mp["params"]
    assert "model.layers.0.mlp.down_proj" not in bits  # fixed by an override, not assigned
    assert bits["model.layers.1.mlp.up_proj"] == 4
    assert set(bits.values()) == {3, 4}
    total = sum(params.values())
    reached = sum(bits[n] * params[n] for n in bits) / total
    assert reached <= 3.5 and reached > 3.5 - max(params.values()) / total
    assert mp["bits_per_weight"] == pytest.approx(reached)
    for full, bit in bits.items():
        assert model.get_submodule(full).weight_quantizer.bit == bit
    assert model.model.layers[0].mlp.down_proj.weight_quantizer.bit == 8


def test_compress_runs_mixed_precision(tiny_llama_dir, tmp_path):
    import json

    cfg = tiny_config(tiny_llama_dir, quant={
        "method": "GPTQ", "weight": {"bit": 4, "group_size": 32},
        "overrides": [{"role": "mlp_out", "weight": {"bit": 8}}, {"role": "attn_out", "blocks": ["1-2"], "do_quant": False}],
        "auto_scheme": {"bits_per_weight": 3.5, "bits": [3, 4]},
    }, save={"save_path": str(tmp_path / "out"), "save_fake": True})
    result = compress(cfg, progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["methods"]["mixed_precision"] == json.loads(json.dumps(result.method_results["mixed_precision"]))
    assert saved["methods"]["mixed_precision"]
    layers = result.model.model.layers
    assert all(layer.mlp.down_proj.weight_quantizer.bit == 8 for layer in layers)
    assert type(layers[1].self_attn.o_proj) is nn.Linear and type(layers[2].self_attn.o_proj) is nn.Linear
    assert isinstance(layers[0].self_attn.o_proj, FakeQuantLinear)
    assigned = [m.weight_quantizer.bit for n, m in result.model.named_modules()
                if isinstance(m, FakeQuantLinear) and "down_proj" not in n]
    assert set(assigned) == {3, 4}
    assert result.ppl("fake_quant") < 2 * result.ppl("pretrain")


@pytest.mark.parametrize("quant, message", [
    ({"overrides": [{"regex": "mlp.(down", "weight": {"bit": 8}}]}, "does not compile"),
    ({"overrides": [{"role": "mlp_middle", "weight": {"bit": 8}}]}, "overrides.0.role"),
    ({"overrides": [{"role": "mlp_in", "weight": {"bit": 9}}]}, "overrides[0].weight.bit"),
    ({"overrides": [{"role": "mlp_in"}, ]}, "changes nothing"),
    ({"overrides": [{"weight": {"bit": 8}}]}, "selects nothing"),
    ({"overrides": [{"role": "mlp_in", "weight": {"bits": 8}}]}, "overrides[0].weight.bits"),
    ({"overrides": [{"role": "mlp_in", "weight": {"quant_type": "nvfp4"}}]}, "overrides[0].weight"),
    ({"overrides": [{"role": "mlp_in", "do_quant": False, "weight": {"bit": 8}}]}, "remove its weight"),
    ({"auto_scheme": {"bits_per_weight": 2.5, "bits": [3, 4]}}, "below the smallest"),
])
def test_config_errors_are_one_line(quant, message):
    with pytest.raises(ConfigError) as exc:
        load_config({"model": {"path": "unused"}, "quant": {"method": "RTN", "weight": {"bit": 4}, **quant}})
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("override, message", [
    ({"regex": r"mlp\.down_prj", "weight": {"bit": 8}}, "quant.overrides[0] matches no linear"),
    ({"role": "mlp_out", "blocks": [7], "weight": {"bit": 8}}, "beyond the model's 3 blocks"),
])
def test_override_matching_nothing_is_one_line(override, message):
    cfg = _cfg("RTN", [override])
    model = build_tiny_model("llama", VOCAB)
    with pytest.raises(ConfigError) as exc:
        check_methods(cfg, build_methods(cfg), model, get_adapter("auto", "llama"))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_mixed_schemes_are_not_written_as_one_scheme_formats(tiny_llama_dir, tmp_path):
    cfg = tiny_config(tiny_llama_dir, quant={"method": "RTN", "overrides": [{"role": "mlp_out", "weight": {"bit": 8}}]},
                      save={"save_path": str(tmp_path / "out"), "save_vllm": True})
    with pytest.raises(ConfigError, match="save.save_vllm writes one scheme per model") as err:
        compress(cfg, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_method_without_module_schemes_refuses():
    with pytest.raises(ConfigError, match="quantizes every linear with one scheme"):
        build_methods(_cfg("HQQ", [{"role": "mlp_in", "weight": {"bit": 8}}]))


def test_joint_quant_with_module_schemes_refuses():
    cfg = load_config({"model": {"path": "unused"},
                       "sparse": {"method": "SparseGPT", "weight": {"sparsity": 0.5}, "special": {"joint_quant": True}},
                       "quant": {"method": "GPTQ", "weight": {"bit": 4, "group_size": 32},
                                 "overrides": [{"role": "mlp_in", "weight": {"bit": 8}}]}})
    with pytest.raises(ConfigError, match="joint_quant rounds every linear"):
        build_methods(cfg)


class Crash(Exception):
    pass


def test_resumed_mixed_run_is_identical(tiny_llama_dir, tmp_path, monkeypatch):
    """A crash after block 1: the resumed run restores each linear with its own scheme and the assignment."""
    import llmc.schedule

    def cfg(out):
        return tiny_config(tiny_llama_dir, quant={
            "method": "GPTQ", "weight": {"bit": 4, "group_size": 32},
            "overrides": [{"regex": r"mlp\.down_proj", "blocks": [0], "weight": {"bit": 8, "group_size": 16}}],
            "auto_scheme": {"bits_per_weight": 3.5, "bits": [3, 4]},
        }, save={"save_fake": True, "save_path": str(out)})

    whole = compress(cfg(tmp_path / "whole"), progress=False)

    def kill(name: str) -> None:
        if name == "block:2":
            raise Crash(name)

    monkeypatch.setattr(llmc.schedule, "kill_point", kill)
    with pytest.raises(Crash):
        compress(cfg(tmp_path / "resumed"), progress=False)
    monkeypatch.undo()
    resumed = compress(cfg(tmp_path / "resumed"), progress=False, resume="require")
    assert resumed.resumed_after_block == 1
    for (name, a), (_, b) in zip(whole.model.named_modules(), resumed.model.named_modules()):
        if isinstance(a, FakeQuantLinear):
            assert a.weight_quantizer == b.weight_quantizer, name
            assert torch.equal(a.fake_weight(), b.fake_weight()), name
    assert resumed.model.model.layers[0].mlp.down_proj.weight_quantizer.group_size == 16
    assert [r.ppl for r in resumed.perplexity] == [r.ppl for r in whole.perplexity]
