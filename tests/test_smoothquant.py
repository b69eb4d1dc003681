"""SmoothQuant: smoothing alone keeps the function, it flattens activation outliers, and W8A8
after it is more accurate than RTN on a model with outlier channels."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from llmc import compress
from llmc.config import load_config
from llmc.errors import ConfigError
from llmc.methods import get_method
from llmc.methods.smoothquant import SmoothQuant, smooth_scales
from llmc.models import get_adapter
from llmc.pipeline import BlockwisePipeline, capture_block_inputs
from llmc.pipeline.blockwise import BlockContext, run_block
from llmc.quant import FakeQuantLinear, fake_quant_modules, quant_disabled

CPU = torch.device("cpu")
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1}
A8_DYNAMIC = {"bit": 8, "symmetric": True, "granularity": "per_token", "static": False}
A8_STATIC = {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True}


def _quant(method: str = "SmoothQuant", act: dict | None = None, **special):
    cfg = load_config({"model": {"path": "unused"},
                       "quant": {"method": method, "weight": W8, "act": act or A8_DYNAMIC, "special": special}})
    return cfg.quant


def _method(final: bool, method: str = "SmoothQuant", act: dict | None = None, **special):
    quant = _quant(method, act, **special)
    return get_method(quant).__class__(quant, final=final)


def _tiny(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, get_adapter("auto", model.config.model_type)


def _ids(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _calib(model, adapter, ids: torch.Tensor):
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": None} for i in range(0, len(ids), 2)]
    return capture_block_inputs(model, adapter, batches, CPU)


def _run(model, adapter, inputs, method) -> None:
    BlockwisePipeline(model, adapter, CPU, progress=False).run(
        inputs, method.process_block, targets=lambda i: adapter.linear_names()
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _block_norm_weights(model, adapter) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.startswith(adapter.blocks) and "norm.weight" in n}


@torch.no_grad()
@pytest.mark.parametrize("linear_producers", [False, True])
def test_smoothing_alone_keeps_logits(tiny_model_dir, linear_producers):
    model, adapter = _tiny(tiny_model_dir)
    ids = _ids(model.config.vocab_size, (3, 40), seed=0)
    expected = model(ids).logits
    norms, weights = _block_norm_weights(model, adapter), {n: p.clone() for n, p in model.named_parameters()}
    inputs = _calib(model, adapter, _ids(model.config.vocab_size, (4, 32), seed=1))
    _run(model, adapter, inputs, _method(final=False, alpha=0.5, smooth_linear_producers=linear_producers))
    assert not fake_quant_modules(model)
    assert norms and all(not torch.equal(p, norms[n]) for n, p in _block_norm_weights(model, adapter).items())
    params = dict(model.named_parameters())
    o = next(n for n in weights if n.endswith(("o_proj.weight", "out_proj.weight")))
    assert torch.equal(params[o], weights[o]) is not linear_producers  # o is smoothed only on request
    assert _rel(model(ids).logits, expected) < 1e-4


@torch.no_grad()
def test_padding_tokens_are_excluded_from_statistics(tiny_llama_dir):
    model, adapter = _tiny(tiny_llama_dir)
    ids = _ids(model.config.vocab_size, (2, 40), seed=2)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    padded = capture_block_inputs(model, adapter, [{"input_ids": ids, "attention_mask": mask}], CPU)
    padded.hidden[0][1, 25:] = 0  # garbage at padded positions (a spike in channel 5) must not count
    padded.hidden[0][1, 25:, 5] = 1000
    real = capture_block_inputs(model, adapter, [{"input_ids": ids[:1], "attention_mask": None},
                                                 {"input_ids": ids[1:, :25], "attention_mask": None}], CPU)
    block = adapter.get_blocks(model)[0]
    method = _method(final=False)
    names = ["self_attn.q_proj", "mlp.gate_proj"]

    def stats(inputs):
        ctx = BlockContext(0, block, adapter, inputs, CPU, adapter.linear_names())
        return method.input_absmax(ctx, names)

    got, want = stats(padded), stats(real)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    padded.token_masks[0] = None
    unmasked = stats(padded)["self_attn.q_proj"]  # normalized: the spike becomes sqrt(hidden) = 8
    assert unmasked[5] > 2 * want["self_attn.q_proj"][5]


def test_scales_formula():
    x = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smooth_scales(x, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 3.0 / math.sqrt(1e-5)]))
    torch.testing.assert_close(smooth_scales(x, w, 1.0)[:2], x[:2])


def _outlier_model(kind: str, vocab: int):
    from conftest import build_tiny_model

    model = build_tiny_model(kind, vocab, seed=3)
    adapter = get_adapter("auto", model.config.model_type)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for block in adapter.get_blocks(model):
            for group in adapter.groups:
                norm = block.get_submodule(group.prev_op)
                if not isinstance(norm, torch.nn.Linear):
                    norm.weight[torch.randperm(norm.weight.numel(), generator=gen)[:4]] *= 30
    return model, adapter


def _outlier_ratio(block, inputs, name: str) -> float:
    seen = []
    handle = block.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        run_block(block, inputs, CPU)
    handle.remove()
    absmax = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).abs().amax(dim=0)
    return float(absmax.max() / absmax.median())


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_smoothing_flattens_outliers_and_beats_rtn(kind, tiny_tokenizer):
    base, adapter = _outlier_model(kind, len(tiny_tokenizer))
    inputs = _calib(base, adapter, _ids(len(tiny_tokenizer), (4, 64), seed=5))
    name = adapter.groups[0].linears[0]
    with torch.no_grad():
        reference = run_block(adapter.get_blocks(base)[0], inputs, CPU)
    errors, ratios = {}, {}
    for method in ("RTN", "SmoothQuant"):
        model = copy.deepcopy(base)
        _run(model, adapter, inputs, _method(final=True, method=method))
        block = adapter.get_blocks(model)[0]
        assert isinstance(block.get_submodule(name), FakeQuantLinear)
        with torch.no_grad():
            out = run_block(block, inputs, CPU)
        errors[method] = _rel(torch.cat(out), torch.cat(reference))
        with quant_disabled(model):
            ratios[method] = _outlier_ratio(block, inputs, name)
    assert ratios["RTN"] > 10  # the injected outliers are there
    assert ratios["SmoothQuant"] < ratios["RTN"] / 3
    assert errors["SmoothQuant"] < errors["RTN"] / 2, errors


@pytest.mark.parametrize(
    ("kind", "act"), [("llama", A8_DYNAMIC), ("opt", A8_DYNAMIC), ("llama", A8_STATIC)],
    ids=["llama-per_token", "opt-per_token", "llama-static"],
)
def test_compress_pipeline(request, kind, act):
    model_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    cfg = tiny_config(model_dir, quant={"method": "SmoothQuant", "weight": W8, "act": act,
                                        "special": {"alpha": 0.5}})
    cfg["eval"]["eval_pos"] = ["pretrain", "transformed", "fake_quant"]
    result = compress(cfg, progress=False)
    wrapped = fake_quant_modules(result.model)
    assert len(wrapped) == len(result.adapter.get_blocks(result.model)) * len(result.adapter.linear_names())
    assert all(m.act_quantizer is not None and m.act_static == act["static"] for _, m in wrapped)
    if act["static"]:
        assert all(m.a_scale.numel() == 1 for _, m in wrapped)
    pre, trans, fq = (result.ppl(p) for p in ("pretrain", "transformed", "fake_quant"))
    assert trans == pytest.approx(pre, rel=1e-4)
    assert math.isfinite(fq) and fq == pytest.approx(pre, rel=0.05)


def test_bad_special_keys():
    with pytest.raises(ConfigError, match="alpah"):
        _quant_method(alpah=0.5)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="alpha"):
            _quant_method(alpha=alpha)
    assert _quant_method().special.alpha == 0.5
    assert _quant_method(alpha=1).special.alpha == 1.0


def _quant_method(**special):
    return SmoothQuant(_quant(**special))


@pytest.mark.real_model
@torch.no_grad()
def test_real_smollm2_smoothing_keeps_logits(real_loaded):
    from llmc.data import build_calibration, load_named_documents

    loaded = real_loaded  # a private copy of the GGUF-loaded model (tests/conftest.py)
    model, adapter = loaded.model, loaded.adapter
    ids = loaded.tokenizer("SmoothQuant migrates the quantization difficulty from activations to weights.",
                           return_tensors="pt").input_ids
    expected = model(ids).logits
    batches = build_calibration(load_named_documents("c4", "calib"), loaded.tokenizer, 2, 32, 2, seed=0)
    inputs = capture_block_inputs(model, adapter, batches, CPU)
    _run(model, adapter, inputs, _method(final=False, alpha=0.5))
    assert _rel(model(ids).logits, expected) < 1e-4
