"""OS+: shifting and scaling alone keep the function (and the saved model), the shift makes the
inputs symmetric and happens only where biases take it, and with quantization OS+ beats RTN and
is at or below SmoothQuant on blocks with asymmetric outlier channels; the coarse-to-fine search
finds the full grid's thresholds there with a third of the candidates."""

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
from llmc.methods import get_method, osplus
from llmc.methods.osplus import OsPlus, candidate_thresholds
from llmc.models import get_adapter
from llmc.pipeline import BlockwisePipeline, capture_block_inputs
from llmc.pipeline.blockwise import BlockContext, run_block
from llmc.quant import fake_quant_modules

CPU = torch.device("cpu")


def _quant(method: str, wbit: int = 8, abit: int = 8, **special):
    return load_config({"model": {"path": "unused"}, "quant": {
        "method": method,
        "weight": {"bit": wbit, "symmetric": False, "granularity": "per_channel"},
        "act": {"bit": abit, "symmetric": False, "granularity": "per_token"},
        "special": special,
    }}).quant


def _method(method: str = "OsPlus", final: bool = True, wbit: int = 8, abit: int = 8, **special):
    quant = _quant(method, wbit, abit, **special)
    return get_method(quant).__class__(quant, final=final)


def _ids(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _calib(model, adapter, ids: torch.Tensor):
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": None} for i in range(0, len(ids), 2)]
    return capture_block_inputs(model, adapter, batches, CPU)


def _run(model, adapter, inputs, method, observe: bool = False) -> None:
    BlockwisePipeline(model, adapter, CPU, progress=False).run(
        inputs, method.process_block, targets=lambda i: adapter.linear_names(),
        observe=method.observe if observe else None,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _outlier_model(kind: str, vocab: int):
    """Asymmetric outlier channels: an offset on 4 embedding channels, 4 channels of every block
    norm scaled by 20 and (where the norm has a bias) offset by +-10."""
    model = build_tiny_model(kind, vocab, seed=3)
    adapter = get_adapter("auto", model.config.model_type)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        embedding = adapter.role(model, "embedding").weight
        embedding[:, torch.randperm(embedding.shape[1], generator=gen)[:4]] += 0.3
        for block in adapter.get_blocks(model):
            for name in (adapter.block_roles.attn_norm, adapter.block_roles.mlp_norm):
                norm = block.get_submodule(name)
                idx = torch.randperm(norm.weight.numel(), generator=gen)[:4]
                norm.weight[idx] *= 20
                if getattr(norm, "bias", None) is not None:
                    norm.bias[idx] += 10 * torch.sign(torch.randn(4, generator=gen))
    return model, adapter


@torch.no_grad()
@pytest.mark.parametrize("linear_producers", [False, True])
def test_transform_alone_keeps_logits(tiny_model_dir, linear_producers):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    adapter = get_adapter("auto", model.config.model_type)
    ids = _ids(model.config.vocab_size, (3, 40), seed=0)
    expected = model(ids).logits
    before = {n: p.clone() for n, p in model.named_parameters()}
    inputs = _calib(model, adapter, _ids(model.config.vocab_size, (4, 32), seed=1))
    _run(model, adapter, inputs, _method(final=False, smooth_linear_producers=linear_producers))
    assert not fake_quant_modules(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()  # no bias was created anywhere
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    norms = {n for n in before if n.startswith(adapter.blocks) and "norm.weight" in n}
    assert norms <= changed
    shifted = {n for n in changed if n.endswith("bias") and "norm" not in n}
    opt = model.config.model_type == "opt"
    assert bool(shifted) is opt  # OPT's biased LayerNorms and linears take the shift, Llama's RMSNorms cannot
    if opt:
        assert any(n.endswith("self_attn_layer_norm.bias") for n in changed)
        assert any(n.endswith("out_proj.bias") for n in changed) is linear_producers  # v->o shifted on request
    assert _rel(model(ids).logits, expected) < 1e-5


@torch.no_grad()
def test_shift_makes_inputs_symmetric():
    model, adapter = _outlier_model("opt", 384)
    inputs = _calib(model, adapter, _ids(384, (4, 48), seed=2))
    block = adapter.get_blocks(model)[0]

    def ranges() -> tuple[torch.Tensor, torch.Tensor]:
        seen = []
        handle = block.get_submodule("self_attn.q_proj").register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        run_block(block, inputs, CPU)
        handle.remove()
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
        return x.amin(dim=0), x.amax(dim=0)

    lo, hi = ranges()
    assert float((hi + lo).abs().max()) > 10  # the offset channels
    method = _method(final=False)
    ctx = BlockContext(0, block, adapter, inputs, CPU, adapter.linear_names())
    plans = method.plans(ctx)
    with method.recording(ctx, plans) as records:
        ctx.forward_until(None)
    shift, scales = method.search(ctx, plans[0], records[0])
    torch.testing.assert_close(shift, (hi + lo) / 2)
    method.fold(ctx, plans[0], shift, scales)
    lo2, hi2 = ranges()
    torch.testing.assert_close(hi2 + lo2, torch.zeros_like(lo2), atol=1e-4, rtol=0)  # symmetric per channel
    torch.testing.assert_close(torch.maximum(hi2, -lo2), torch.maximum(hi - lo, torch.zeros_like(lo)) / 2 / scales)


def test_shift_only_where_every_reader_has_a_bias(tiny_opt_dir, tiny_llama_dir):
    def plans(model, block: int = 0, **special):
        adapter = get_adapter("auto", model.config.model_type)
        ctx = BlockContext(0, adapter.get_blocks(model)[block], adapter, None, CPU, adapter.linear_names())
        return {p.group.name: p.shift for p in _method(smooth_linear_producers=True, **special).plans(ctx)}

    opt = AutoModelForCausalLM.from_pretrained(tiny_opt_dir)
    assert plans(opt) == {"qkv": True, "out": True, "fc1": True, "fc2": False}  # no shift through ReLU
    opt.model.decoder.layers[0].self_attn.k_proj.bias = None
    assert plans(opt)["qkv"] is False
    assert plans(opt, block=1) == {"qkv": True, "out": True, "fc1": True, "fc2": False}
    assert not any(plans(opt, block=1, use_shift=False).values())
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not any(plans(llama).values())


def test_candidate_thresholds():
    t = candidate_thresholds(torch.tensor([0.0, 1.0, 2.0, 64.0]), 7)
    torch.testing.assert_close(t, torch.tensor([64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0]))
    assert candidate_thresholds(torch.tensor([3.0, 3.0]), 5).tolist() == [3.0]
    assert candidate_thresholds(torch.zeros(4), 5).numel() == 0


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("bits", [6, 4], ids=["W6A6", "W4A4"])
def test_beats_rtn_and_smoothquant_on_outliers(kind, bits, tiny_tokenizer):
    base, adapter = _outlier_model(kind, len(tiny_tokenizer))
    inputs = _calib(base, adapter, _ids(len(tiny_tokenizer), (4, 64), seed=5))
    with torch.no_grad():
        reference = torch.cat(run_block(adapter.get_blocks(base)[0], inputs, CPU))
    errors = {}
    for name in ("RTN", "SmoothQuant", "OsPlus"):
        model = copy.deepcopy(base)
        _run(model, adapter, inputs, _method(name, wbit=bits, abit=bits), observe=name == "OsPlus")
        with torch.no_grad():
            errors[name] = _rel(torch.cat(run_block(adapter.get_blocks(model)[0], inputs, CPU)), reference)
    assert errors["OsPlus"] < errors["RTN"] / 1.4, errors
    if kind == "opt":  # asymmetric outliers the shift removes (biased LayerNorms)
        assert errors["OsPlus"] < errors["SmoothQuant"], errors
    else:  # RMSNorm: no shift, scaling only; on par with SmoothQuant
        assert errors["OsPlus"] < errors["SmoothQuant"] * 1.05, errors


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_compress_saves_and_reloads(request, kind, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    cfg = tiny_config(model_dir, quant={"method": "OS+", "weight": {"bit": 8, "granularity": "per_channel"},
                                        "act": {"bit": 8, "granularity": "per_token"},
                                        "special": {"smooth_linear_producers": True, "n_grid": 20}})
    cfg["eval"]["eval_pos"] = ["pretrain", "transformed", "fake_quant"]
    cfg["save"] = {"save_trans": True, "save_path": str(tmp_path / "out")}
    result = compress(cfg, progress=False)
    wrapped = fake_quant_modules(result.model)
    assert len(wrapped) == len(result.adapter.get_blocks(result.model)) * len(result.adapter.linear_names())
    pre, trans, fq = (result.ppl(p) for p in ("pretrain", "transformed", "fake_quant"))
    assert trans == pytest.approx(pre, rel=1e-4)
    assert math.isfinite(fq) and fq == pytest.approx(pre, rel=0.05)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "transformed_model", dtype=torch.float32).eval()
    ids = _ids(original.config.vocab_size, (2, 40), seed=9)
    assert saved.state_dict().keys() == original.state_dict().keys()
    norm = next(k for k in original.state_dict() if k.startswith(result.adapter.blocks) and "norm.weight" in k)
    assert not torch.equal(saved.state_dict()[norm], original.state_dict()[norm])  # the transform was saved
    with torch.no_grad():
        assert _rel(saved(ids).logits, original(ids).logits) < 1e-5


def test_bad_special_keys():
    with pytest.raises(ConfigError, match=r"weight_clip.*\[OsPlus, AWQ\]"):
        OsPlus(_quant("OsPlus", weight_clip=True))
    with pytest.raises(ConfigError, match="use_shfit"):
        OsPlus(_quant("OsPlus", use_shfit=False))
    with pytest.raises(ConfigError, match="n_grid"):
        OsPlus(_quant("OsPlus", n_grid=0))
    method = OsPlus(_quant("OS+", use_shift=False))
    assert method.special.use_shift is False and method.special.n_grid == 100
    assert type(get_method(_quant("os+"))) is OsPlus


def _search_all_groups(kind: str, bits: int, monkeypatch, **special):
    """Scales OS+ picks for every group of the outlier model, and how many candidates it scored."""
    base, adapter = _outlier_model(kind, 384)
    inputs = _calib(base, adapter, _ids(384, (4, 64), seed=5))
    scored, picked = [], []
    error, search = osplus.output_error, OsPlus.search
    with monkeypatch.context() as patch:
        patch.setattr(osplus, "output_error", lambda *a: scored.append(1) or error(*a))
        patch.setattr(OsPlus, "search", lambda *a: picked.append(search(*a)) or picked[-1])
        _run(copy.deepcopy(base), adapter, inputs, _method(wbit=bits, abit=bits, **special), observe=True)
    return [scales for _, scales in picked], len(scored)


@pytest.mark.parametrize(("kind", "bits"), [("opt", 4), ("llama", 6)])
def test_coarse_to_fine_finds_the_full_grids_best(kind, bits, monkeypatch):
    full, tried_all = _search_all_groups(kind, bits, monkeypatch, coarse_to_fine=False)
    fast, tried = _search_all_groups(kind, bits, monkeypatch)
    assert tried_all == 100 * len(full) and tried <= 0.4 * tried_all, (tried, tried_all)
    for a, b in zip(full, fast, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grid_helpers():
    assert osplus.coarse_step(100) == 5 and osplus.coarse_step(20) == 2 and osplus.coarse_step(3) == 1
    assert osplus.refined(100, 5, [0, 50]) == [0, 1, 2, 3, 4, 46, 47, 48, 49, 50, 51, 52, 53, 54]
    errors = torch.tensor([3.0, 1.0, float("nan"), 1.0, float("inf"), 0.5])
    assert osplus._ranked(errors) == [5, 1, 3, 0, 4, 2]  # ties keep the larger t (first), NaN last


def test_search_tokens_limit_the_scored_batches():
    model, adapter = _outlier_model("llama", 384)
    inputs = _calib(model, adapter, _ids(384, (6, 32), seed=2))  # 3 batches of 64 tokens
    block = adapter.get_blocks(model)[0]
    ranges = {}
    for limit in (None, 130):
        method = _method(search_tokens=limit)
        ctx = BlockContext(0, block, adapter, inputs, CPU, adapter.linear_names())
        with method.recording(ctx, method.plans(ctx)) as records:
            ctx.forward_until(None)
        assert all(len(r.calls) == (3 if limit is None else 2) for r in records)
        ranges[limit] = [(r.xmin, r.xmax) for r in records]  # channel ranges: always every batch
    for (lo, hi), (lo2, hi2) in zip(ranges[None], ranges[130]):
        assert torch.equal(lo, lo2) and torch.equal(hi, hi2)


def test_linears_reading_one_input_share_its_transform():
    linears = [torch.nn.Linear(4, 3) for _ in range(3)]
    calls = []
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    with osplus.transformed_inputs(linears, lambda t: calls.append(t) or t * 2):
        outs = [m(x) for m in linears] + [linears[0](y)]
    assert len(calls) == 2 and calls[0] is x and calls[1] is y
    torch.testing.assert_close(outs[1], linears[1](2 * x))
