"""Mixture-of-experts models (llmc.models.moe): fused experts split into per-expert linears and back,
every expert calibrated from every token, routed-token counts and the warning about starved experts.

- prepare is exact: the per-expert model gives bit-identical logits to transformers' own (eager)
  experts loop, with the calibration switch off, on, and on with routed tokens only;
- restore round-trips: the save_trans and save_fake folders reload with transformers' own fused
  class and give the in-memory logits bit for bit;
- a router that never picks experts 2 and 3 (Mixtral, Qwen3-MoE): with `calib.moe_all_experts`
  (default) GPTQ's and AWQ's statistics of every expert come from all calibration tokens, with it
  off the starved experts see none (and GPTQ rounds them instead of zeroing them); results.json
  holds the routed counts (0 for the starved experts) and a warning names them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config
from zoo.moe import ZOO

from llmc import compress, load_config
from llmc.config.schema import CalibSection, ModelSection
from llmc.models import load_model
from llmc.models.coverage import uncovered
from llmc.models.moe import ExpertMLP, RoutedExperts, moe_calibration
from llmc.pipeline.blockwise import BlockContext
from llmc.quant import quant_disabled

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
SPECS = {spec.id: spec for spec in ZOO}
N_SAMPLES, SEQ_LEN = 2, 32
CALIB_TOKENS = N_SAMPLES * SEQ_LEN
STARVED = [2, 3]


def build(spec_id: str, vocab_size: int, starve: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(SPECS[spec_id].config(vocab_size), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        if starve:
            # Channel 0 of the residual stream is large and positive for every token, and the routers
            # read only that channel: experts 0 and 1 get logit +x0, experts 2 and 3 get -x0, so top-2
            # never picks 2 or 3.
            model.model.embed_tokens.weight[:, 0] = 4.0
            for layer in model.model.layers:
                router = layer.mlp.gate.weight
                router.zero_()
                router[:2, 0], router[2:, 0] = 1.0, -1.0
    return model.eval()


class Folders(dict):
    """Saved tiny models by (zoo id, starved router), built on first use."""

    def __init__(self, root, tokenizer) -> None:
        super().__init__()
        self.root, self.tokenizer = root, tokenizer

    def __missing__(self, key: tuple[str, bool]) -> Path:
        spec_id, starve = key
        path = self.root.mktemp(f"moe-{spec_id}-{'starved' if starve else 'random'}")
        build(spec_id, len(self.tokenizer), starve).save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self[key] = path
        return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer) -> Folders:
    return Folders(tmp_path_factory, tiny_tokenizer)


def ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(), use_cache=False).logits


def reference(folder: Path, eager: bool = True) -> torch.nn.Module:
    """The checkpoint as transformers runs it: fused experts (eager loop, or its default kernel)."""
    kwargs = {"experts_implementation": "eager"} if eager else {}
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def run(folder: Path, quant: dict, tmp_path: Path, save: dict | None = None, **calib):
    cfg = tiny_config(folder, quant=quant)
    cfg["calib"].update(n_samples=N_SAMPLES, seq_len=SEQ_LEN, bs=1, **calib)
    del cfg["eval"]
    cfg["save"] = {"save_path": str(tmp_path / "out"), **(save or {})}
    return compress(load_config(cfg), progress=False)


def w4(method: str, **special) -> dict:
    quant = {"method": method, "weight": {"bit": 4, "granularity": "per_group", "group_size": 32}}
    if special:
        quant["special"] = special
    return quant


@pytest.mark.parametrize("spec_id", sorted(SPECS))
def test_prepare_is_exact(spec_id, folders):
    folder = folders[spec_id, False]
    expected = logits(reference(folder))
    loaded = load_model(ModelSection(path=str(folder), torch_dtype="float32"))
    model, adapter = loaded.model, loaded.adapter
    blocks = adapter.get_blocks(model)
    assert any(isinstance(m, RoutedExperts) for m in model.modules())
    for block in blocks:
        assert uncovered(adapter, block) == []
        assert not [n for n, p in block.named_parameters() if p.dim() >= 3]
    sparse = blocks[0]

    def group_names() -> list[str]:
        return [g.name for g in adapter.block_groups(sparse)]

    assert torch.equal(logits(model), expected)
    assert "expert_in.3" in group_names() and "moe_in" not in group_names()  # routed tokens: a group per expert
    with moe_calibration(model):
        assert all(m.calibrating and m.all_experts for m in model.modules() if isinstance(m, RoutedExperts))
        assert "moe_in" in group_names() and "expert_in.0" not in group_names()  # all tokens: one shared input
        assert torch.equal(logits(model), expected)
    with moe_calibration(model, CalibSection(moe_all_experts=False)):
        assert "expert_in.3" in group_names() and "moe_in" not in group_names()
        assert torch.equal(logits(model), expected)
    # transformers' default experts kernel (grouped_mm) itself differs from its eager loop by rounding
    torch.testing.assert_close(logits(model), logits(reference(folder, eager=False)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec_id", ["mixtral", "qwen2_moe"])
def test_restore_round_trips(spec_id, folders, tmp_path):
    folder = folders[spec_id, False]
    result = run(folder, w4("AWQ"), tmp_path, {"save_trans": True, "save_fake": True})
    out = tmp_path / "out"
    with quant_disabled(result.model):
        transformed = logits(result.model)
    assert torch.equal(logits(reference(out / "transformed_model")), transformed)
    assert torch.equal(logits(reference(out / "fake_quant_model")), logits(result.model))
    assert not torch.equal(transformed, logits(reference(folder)))  # AWQ did change the weights
    # the undo put the per-expert modules back and dropped the fused copies
    experts = [m for m in result.model.modules() if isinstance(m, RoutedExperts)]
    assert experts and all(not list(m.fused.parameters(recurse=False)) for m in experts)


@pytest.mark.parametrize("spec_id", ["mixtral", "qwen2_moe"])
def test_compressed_tensors_ignore_names_the_checkpoints_routers(spec_id, folders, tmp_path):
    """vLLM matches `ignore` against the checkpoint's module names: every router there must match,
    and no quantized linear may."""
    import json
    import re

    from safetensors import safe_open

    quant = w4("RTN")
    quant["weight"]["symmetric"] = True
    run(folders[spec_id, False], quant, tmp_path, {"save_vllm": True})
    folder = tmp_path / "out" / "vllm_quant_model"
    ignore = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    patterns = [re.compile(p[3:]) for p in ignore if p.startswith("re:")]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    modules = {k.rsplit(".", 1)[0] for k in keys}
    routers = {m for m in modules if m.endswith((".gate", ".shared_expert_gate"))}
    quantized = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight_packed")}
    assert routers and quantized
    assert all(any(p.match(m) for p in patterns) for m in routers), (routers, ignore)
    assert not any(p.match(m) for p in patterns for m in quantized)


def test_wanda_prunes_experts_no_token_reached(folders):
    """With routed tokens only, a starved expert has no input norm: Wanda still prunes it (by magnitude)."""
    cfg = tiny_config(folders["mixtral", True], sparse={"method": "Wanda", "weight": {"sparsity": 0.5}})
    cfg["calib"].update(n_samples=N_SAMPLES, seq_len=SEQ_LEN, bs=1, moe_all_experts=False)
    del cfg["eval"]
    result = compress(load_config(cfg), progress=False)
    for block in result.adapter.get_blocks(result.model):
        for expert in (2, 3):  # never routed to (see build)
            w = block.get_submodule(f"mlp.experts.{expert}.w1").weight
            assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all()


@pytest.fixture
def observed(monkeypatch) -> dict[tuple[int, str], int]:
    """Rows each hooked linear input got through `BlockContext.hook_inputs`, per (block, name)."""
    rows: dict[tuple[int, str], int] = {}
    original = BlockContext.hook_inputs

    def hook_inputs(self, names, fn, only_real_tokens=False):
        def counting(name, x):
            rows[self.index, name] = rows.get((self.index, name), 0) + x.reshape(-1, x.shape[-1]).shape[0]
            fn(name, x)

        return original(self, names, counting, only_real_tokens)

    monkeypatch.setattr(BlockContext, "hook_inputs", hook_inputs)
    return rows


@pytest.fixture
def hessians(monkeypatch) -> dict[tuple[int, str], torch.Tensor]:
    """GPTQ's Hessian of each group, per (block, the group's first linear)."""
    import llmc.methods.gptq as gptq
    import llmc.methods.sequential_passes as passes

    found: dict[tuple[int, str], torch.Tensor] = {}
    original = gptq.group_hessians

    def group_hessians(ctx, groups, **kwargs):
        hs, recorded = original(ctx, groups, **kwargs)
        for group, h in zip(groups, hs):
            found[ctx.index, group[0][0]] = h.clone()
        return hs, recorded

    monkeypatch.setattr(gptq, "group_hessians", group_hessians)  # true_sequential: false
    monkeypatch.setattr(passes, "group_hessians", group_hessians)  # true_sequential
    return found


def names(spec_id: str) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if spec_id == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def expert_linears(result, block: int, expert: int) -> list[torch.nn.Module]:
    module = result.adapter.get_blocks(result.model)[block].mlp.experts[expert]
    assert isinstance(module, ExpertMLP)
    return list(module.projections())


def check_routing(tmp_path: Path, all_experts: bool) -> None:
    routing = json.loads((tmp_path / "out" / "results.json").read_text())["moe_routing"]
    assert routing["all_experts"] is all_experts and routing["calib_tokens"] == CALIB_TOKENS
    assert routing["min_tokens"] == 8
    assert sorted(routing["experts"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for block in routing["experts"].values():
        assert block["routed_tokens"] == [CALIB_TOKENS, CALIB_TOKENS, 0, 0]
        assert block["below_min_tokens"] == STARVED


def check_warning(caplog, all_experts: bool) -> None:
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "router sent" in r.getMessage()]
    assert len(lines) == 2, lines  # one per block
    for block, line in enumerate(lines):
        assert f"model.layers.{block}.mlp.experts" in line and "experts 2 (0), 3 (0)" in line
        assert ("still quantized from all calibration tokens" in line) is all_experts
        assert ("set calib.moe_all_experts: true" in line) is not all_experts


@pytest.mark.parametrize("spec_id", ["mixtral", "qwen3_moe"])
def test_starved_experts_get_every_calibration_token(spec_id, folders, tmp_path, observed, hessians, caplog):
    gate, up, down = names(spec_id)
    with caplog.at_level(logging.WARNING, logger="llmc"):
        result = run(folders[spec_id, True], w4("GPTQ"), tmp_path, moe_min_tokens=8)
    for block in range(2):
        # one group (one Hessian) for every expert's gate/up, from all tokens; each expert's down from all tokens
        assert observed[block, f"mlp.experts.0.{gate}"] == CALIB_TOKENS
        for expert in range(4):
            assert observed[block, f"mlp.experts.{expert}.{down}"] == CALIB_TOKENS
            h = hessians[block, f"mlp.experts.{expert}.{down}"]
            assert h.abs().sum() > 0 and not torch.equal(h, torch.eye(h.shape[0]))
        assert (block, f"mlp.experts.2.{gate}") not in hessians  # shares expert 0's Hessian
        for expert in STARVED:
            assert all(torch.count_nonzero(m.weight) > 0 for m in expert_linears(result, block, expert))
    check_routing(tmp_path, all_experts=True)
    check_warning(caplog, all_experts=True)
    assert torch.isfinite(logits(result.model)).all()


@pytest.mark.parametrize("spec_id", ["mixtral", "qwen3_moe"])
def test_starved_experts_with_routed_tokens_only(spec_id, folders, tmp_path, observed, hessians, caplog):
    gate, up, down = names(spec_id)
    with caplog.at_level(logging.WARNING, logger="llmc"):
        result = run(folders[spec_id, True], w4("GPTQ"), tmp_path, moe_all_experts=False, moe_min_tokens=8)
    for block in range(2):
        for expert in range(4):
            # a Hessian per expert, from the tokens routed to it: experts 0 and 1 get every token
            seen = 0 if expert in STARVED else CALIB_TOKENS
            assert observed.get((block, f"mlp.experts.{expert}.{gate}"), 0) == seen
            assert observed.get((block, f"mlp.experts.{expert}.{down}"), 0) == seen
            h = hessians[block, f"mlp.experts.{expert}.{gate}"]
            assert torch.equal(h, torch.eye(h.shape[0])) is (expert in STARVED)
        for expert in STARVED:  # rounded without statistics, not zeroed by an empty Hessian
            assert all(torch.count_nonzero(m.fake_weight()) > 0 for m in expert_linears(result, block, expert))
    check_routing(tmp_path, all_experts=False)
    check_warning(caplog, all_experts=False)
    assert torch.isfinite(logits(result.model)).all()


@pytest.mark.parametrize("all_experts,clip", [(True, False), (False, False), (False, True)])
def test_awq_on_starved_experts(all_experts, clip, folders, tmp_path, observed):
    folder = folders["mixtral", True]
    expected = logits(reference(folder))
    result = run(folder, w4("AWQ", weight_clip=clip), tmp_path, moe_all_experts=all_experts, moe_min_tokens=8)
    for block in range(2):
        for expert in range(4):
            rows = observed.get((block, f"mlp.experts.{expert}.w2"), 0)
            if all_experts or expert not in STARVED:
                assert rows and rows % CALIB_TOKENS == 0  # every calibration token, in each recording pass
            else:
                assert rows == 0
    check_routing(tmp_path, all_experts)
    original = reference(folder).model.layers
    for layer, before in zip(result.model.model.layers, original):
        norm, router = layer.post_attention_layernorm.weight, layer.mlp.gate.weight
        # routed tokens only: the experts' gate/up are not scaled, so the norm they share is left alone
        assert torch.equal(norm, before.post_attention_layernorm.weight) is not all_experts
        # a scale folded into the norm reaches the router's columns too (router * norm is unchanged)
        torch.testing.assert_close(router * norm, before.mlp.gate.weight * before.post_attention_layernorm.weight)
    if clip:  # clipping changes the float weights; it ran without statistics for the starved experts
        assert torch.isfinite(logits(result.model)).all()
        return
    # the scales folded into the post-attention norm reached the router too: same routing, same function
    with quant_disabled(result.model):
        torch.testing.assert_close(logits(result.model), expected, rtol=1e-4, atol=1e-4)
