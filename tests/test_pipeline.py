"""The block loop reproduces the model's own forward; perplexity matches a direct reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM

from llmc.eval.perplexity import apply_head, evaluate_perplexity
from llmc.methods import get_method
from llmc.models import get_adapter
from llmc.pipeline import BlockwisePipeline, capture_block_inputs
from llmc.quant import FakeQuantLinear, quant_disabled

CPU = torch.device("cpu")


def _model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, get_adapter("auto", model.config.model_type)


def test_adapters_resolve(tiny_llama_dir, tiny_opt_dir):
    assert _model(tiny_llama_dir)[1].name == "Llama"
    assert _model(tiny_opt_dir)[1].name == "OPT"
    assert get_adapter("SmolLM").name == "Llama"
    assert get_adapter("qwen2").name == "Qwen2"


@torch.no_grad()
def test_block_loop_reproduces_logits(tiny_model_dir):
    model, adapter = _model(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 48), generator=gen)
    expected = model(ids).logits
    batches = [{"input_ids": ids[:2], "attention_mask": None}, {"input_ids": ids[2:], "attention_mask": None}]
    inputs = capture_block_inputs(model, adapter, batches, CPU)
    assert len(inputs) == 2 and inputs.num_tokens() == 4 * 48
    out = BlockwisePipeline(model, adapter, CPU, progress=False).run(inputs)
    logits = torch.cat([apply_head(model, adapter, h, CPU) for h in out.hidden])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_block_loop_with_padding_mask(tiny_model_dir):
    """Right-padded documents: the attention mask reaches every block through the captured kwargs."""
    model, adapter = _model(tiny_model_dir)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    expected = model(ids, attention_mask=mask).logits
    inputs = capture_block_inputs(model, adapter, [{"input_ids": ids, "attention_mask": mask}], CPU)
    assert inputs.num_tokens() == 40 + 25
    out = BlockwisePipeline(model, adapter, CPU, progress=False).run(inputs)
    logits = apply_head(model, adapter, out.hidden[0], CPU)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], expected[keep], rtol=1e-5, atol=1e-5)


def _reference_ppl(model, windows):
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0, :-1].double()
            nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
            count += w.numel() - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("per_block", [False, True])
def test_perplexity_matches_reference(tiny_model_dir, per_block):
    model, adapter = _model(tiny_model_dir)
    windows = torch.randint(3, model.config.vocab_size, (5, 32), generator=torch.Generator().manual_seed(2))
    result = evaluate_perplexity(model, adapter, windows, CPU, bs=2, inference_per_block=per_block, progress=False)
    assert result.windows == 5 and result.tokens_scored == 5 * 31
    assert result.ppl == pytest.approx(_reference_ppl(model, windows), rel=1e-5)


def test_rtn_pipeline_wraps_targets_and_respects_ignored(tiny_llama_dir):
    from llmc.config import load_config
    from llmc.schedule import block_targets

    model, adapter = _model(tiny_llama_dir)
    cfg = load_config(
        {
            "model": {"path": str(tiny_llama_dir)},
            "quant": {
                "method": "Naive",
                "weight": {"bit": 4, "granularity": "per_group", "group_size": 32},
                "ignored_layers": {"block_ids": [1], "layer_names": ["mlp.down_proj"]},
            },
        }
    )
    method = get_method(cfg.quant)
    BlockwisePipeline(model, adapter, CPU, progress=False).run(
        None, method.process_block, targets=lambda i: block_targets(cfg.quant.ignored_layers, adapter, adapter.get_blocks(model)[i], i)
    )
    blocks = adapter.get_blocks(model)
    assert isinstance(blocks[0].self_attn.q_proj, FakeQuantLinear)
    assert not isinstance(blocks[0].mlp.down_proj, FakeQuantLinear)
    assert not any(isinstance(m, FakeQuantLinear) for m in blocks[1].modules())
    assert isinstance(blocks[2].mlp.gate_proj, FakeQuantLinear)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        quantized = model(ids).logits
        with quant_disabled(model):
            restored = model(ids).logits
    reference = build_tiny_model("llama", model.config.vocab_size)  # same seed as the saved one
    with torch.no_grad():
        torch.testing.assert_close(restored, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(quantized, restored)


def _first_block_context(model_dir, seed: int, samples: int = 4, seq: int = 24):
    """The first block of a tiny model with calibration inputs of two-sample batches, and its context."""
    from llmc.pipeline import BlockContext

    model, adapter = _model(model_dir)
    ids = torch.randint(3, model.config.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(seed))
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": None} for i in range(0, samples, 2)]
    inputs = capture_block_inputs(model, adapter, batches, CPU)
    block = adapter.get_blocks(model)[0]
    return adapter, block, inputs, BlockContext(0, block, adapter, inputs, CPU, adapter.linear_names())


@torch.no_grad()
def test_forward_until_sees_the_same_inputs(tiny_model_dir):
    """Stopping each batch after a submodule observes exactly what a full block forward observes there."""
    adapter, _, _, ctx = _first_block_context(tiny_model_dir, seed=5)
    name = adapter.groups[2].linears[0]  # first linear of the MLP: after attention
    seen: dict[str, list] = {"full": [], "until": []}
    with ctx.hook_inputs([name], lambda _n, x: seen["full"].append(x.clone())):
        ctx.forward()
    with ctx.hook_inputs([name], lambda _n, x: seen["until"].append(x.clone())):
        ctx.forward_until(name)
    assert len(seen["full"]) == len(seen["until"]) == 2
    for a, b in zip(seen["full"], seen["until"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_forward_until_stops_before_records_and_replays(tiny_model_dir):
    """`inclusive=False` stops before the module runs; a recorded child, replayed, gives the same
    inputs downstream as computing it; `batches` limits the run."""
    adapter, block, _, ctx = _first_block_context(tiny_model_dir, seed=6)
    mlp_first = adapter.groups[2].linears[0]
    attention = adapter.groups[0].linears[0].split(".")[0]  # the child holding q/k/v and the output linear
    ran: list[int] = []
    handle = block.get_submodule(mlp_first).register_forward_hook(lambda *_: ran.append(1))
    seen: dict[str, list] = {"computed": [], "replayed": []}
    with ctx.hook_inputs([mlp_first], lambda _n, x: seen["computed"].append(x.clone())):
        recorded = ctx.forward_until(mlp_first, inclusive=False, record=[attention, mlp_first])
    assert not ran and list(recorded) == [attention] and len(recorded[attention]) == 2
    calls: list[int] = []
    inner = block.get_submodule(adapter.groups[0].linears[0])
    inner_handle = inner.register_forward_hook(lambda *_: calls.append(1))
    with ctx.hook_inputs([mlp_first], lambda _n, x: seen["replayed"].append(x.clone())):
        ctx.forward_until(mlp_first, inclusive=False, replay=recorded)
    assert not calls, "a replayed child must not run"
    for a, b in zip(seen["computed"], seen["replayed"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    child = block.get_submodule(attention)
    assert "forward" not in vars(child), "replay must restore the module"
    wrapper = child.forward  # an instance-level forward, as accelerate's hooks install, is put back
    child.forward = wrapper
    ctx.forward_until(mlp_first, inclusive=False, replay=recorded)
    assert vars(child)["forward"] is wrapper
    del child.forward
    ctx.forward_until(None, batches=1)
    assert ctx.batch == 0
    handle.remove()
    inner_handle.remove()


@pytest.mark.parametrize(("method", "explicit", "expected"), [
    ("GPTQ", None, True), ("RTN", None, False), (["AWQ", "GPTQ"], None, True), ("GPTQ", False, False),
    ("AWQ", True, True),
])
def test_quant_out_default_follows_the_methods(method, explicit, expected):
    from llmc.config import load_config
    from llmc.methods import get_methods
    from llmc.schedule import compress_batches

    model = build_tiny_model("llama", 384)
    quant = {"method": method, "weight": {"bit": 4, "granularity": "per_group", "group_size": 32}}
    if explicit is not None:
        quant["quant_out"] = explicit
    cfg = load_config({"model": {"path": "unused"}, "quant": quant})
    batches = [{"input_ids": torch.randint(0, 384, (2, 16)), "attention_mask": None}]
    pipeline = compress_batches(cfg, model, get_adapter("auto", "llama"), get_methods(cfg.quant),
                                torch.device("cpu"), batches, progress=False)
    assert pipeline.quant_out is expected


@torch.no_grad()
def test_fake_weights_are_quantized_once_per_forward(tiny_llama_dir):
    """A block forward over several batches quantizes each weight once, and gives what quantizing
    it in every batch gives; the reused copies are gone afterwards."""
    from llmc.quant import FakeQuantLinear
    from llmc.quant.quantizer import IntQuantizer

    adapter, block, inputs, ctx = _first_block_context(tiny_llama_dir, seed=7, samples=6, seq=16)
    wrapped = [FakeQuantLinear.wrap(block, n, IntQuantizer(bit=3, symmetric=False, granularity="per_group",
                                                      group_size=16))
               for n in adapter.linear_names()]
    calls = []
    for m in wrapped:
        m.fake_weight = (lambda f: lambda: calls.append(1) or f())(m.fake_weight)
    reused = ctx.forward()
    assert len(calls) == len(wrapped)
    calls.clear()
    every_batch = [block(h, *a, **k) for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs)]
    every_batch = [out[0] if isinstance(out, tuple) else out for out in every_batch]
    assert len(calls) > len(wrapped)
    for a, b in zip(reused, every_batch, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(m._reused is None and not m.reuse_weight for m in wrapped)


def test_released_inputs_in_memory_are_freed():
    """A consumed block's inputs held in memory are emptied (the run that captured them keeps their
    object to the end: a 7B model's 2 GiB of captured activations stayed on the GPU the whole run)."""
    import weakref

    from llmc.pipeline.capture import BlockInputs

    hidden = [torch.ones(2, 3), torch.ones(2, 3)]
    ref = weakref.ref(hidden[0])
    inputs = BlockInputs(hidden, [(), ()], [{}, {}], [])
    del hidden
    inputs.release()
    assert len(inputs.hidden) == 0 and ref() is None


@torch.no_grad()
def test_replay_through_last_linear_reproduces_the_child_or_refuses(tiny_model_dir):
    """A child replayed through its last linear's kept inputs gives exactly its outputs of every batch,
    without running what precedes the linear; a child that does more after that linear is refused."""
    from llmc.pipeline.context import LinearReplay

    adapter, block, _, ctx = _first_block_context(tiny_model_dir, seed=7)
    out_linear = adapter.groups[1].linears[0]  # attention's output projection
    attention = out_linear.split(".")[0]
    kept: list[torch.Tensor] = []
    handle = block.get_submodule(out_linear).register_forward_pre_hook(lambda _m, args: kept.append(args[0]))
    recorded = ctx.forward_until(attention, record=[attention])[attention]
    handle.remove()
    replay = ctx.replay_through(attention, out_linear, kept, {})
    assert isinstance(replay, LinearReplay) and len(replay) == len(recorded) == 2
    first = block.get_submodule(adapter.groups[0].linears[0])
    calls: list[int] = []
    first_handle = first.register_forward_hook(lambda *_: calls.append(1))
    for batch, real in enumerate(recorded):
        ctx.batch = batch
        got = replay[batch]
        real = real[0] if isinstance(real, tuple) else real
        assert torch.equal(got[0] if isinstance(got, tuple) else got, real)
    assert not calls, "replaying must not run the attention's input projections"
    first_handle.remove()
    child = block.get_submodule(attention)
    original = type(child).forward
    child.forward = lambda *a, **k: (original(child, *a, **k)[0] * 2, None)  # something after the linear
    try:
        assert ctx.replay_through(attention, out_linear, kept, {}) is None
    finally:
        del child.forward
