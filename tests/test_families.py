"""Conformance of every model family, each checked the same way on a tiny random model built from
its transformers config class (tests/zoo/):

- `model.type: auto` picks the family's adapter, and the declaration covers every linear of
  every block (routers only when declared float on purpose);
- the block loop (captured per-layer inputs, one block at a time, the adapter's head) gives the
  model's own logits to 1e-5;
- AWQ's and SmoothQuant's scale folding, with quantization switched off, keep the logits to 1e-4;
- RTN, GPTQ, AWQ and SmoothQuant run; GPTQ's save_fake folder reloads with the family's Auto
  class and gives the in-memory logits; its compressed-tensors folder loads through transformers
  and gives the same logits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config
from zoo import TinyModel, all_models

from llmc import compress, load_config
from llmc.config.schema import ModelSection
from llmc.eval.perplexity import apply_head, stream_hidden_states
from llmc.models import load_model
from llmc.models.coverage import uncovered
from llmc.quant import quant_disabled

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
CPU = torch.device("cpu")
MODELS = all_models()
_FOLDERS: dict[str, Path] = {}


def build(spec: TinyModel, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = spec.config(vocab_size)
    model = spec.build(config) if spec.build else getattr(transformers, spec.auto_class).from_config(
        config, dtype=torch.float32
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # widen the tiny init so quantization error and logits are visible
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture
def folder(request, tmp_path_factory, tiny_tokenizer) -> Path:
    spec: TinyModel = request.param
    if spec.id not in _FOLDERS:
        path = tmp_path_factory.mktemp(f"family-{spec.id}")
        build(spec, len(tiny_tokenizer)).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        _FOLDERS[spec.id] = path
    return _FOLDERS[spec.id]


def ids_for(folder: Path) -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def params():
    return pytest.mark.parametrize("spec,folder", [(m, m) for m in MODELS], ids=[m.id for m in MODELS],
                                   indirect=["folder"])


def run(spec: TinyModel, folder: Path, quant: dict, save: dict | None = None):
    cfg = tiny_config(folder, quant=quant)
    cfg["calib"].update(n_samples=2, seq_len=32, bs=1)
    del cfg["eval"]
    if save:
        cfg["save"] = save
    return compress(load_config(cfg), progress=False)


def w4(method: str, spec: TinyModel, **special) -> dict:
    quant = {"method": method, "weight": {"bit": 4, "granularity": "per_group", "group_size": spec.group_size}}
    if special:
        quant["special"] = special
    return quant


@params()
def test_adapter_covers_the_model_and_block_loop_matches(spec, folder):
    loaded = load_model(ModelSection(type="auto", path=str(folder), torch_dtype="float32"))
    assert loaded.adapter.name == spec.adapter
    for index, block in enumerate(loaded.adapter.get_blocks(loaded.model)):
        assert uncovered(loaded.adapter, block) == [], f"block {index}"
    ids = ids_for(folder)
    hidden = stream_hidden_states(loaded.model, loaded.adapter, [ids], CPU)
    with torch.no_grad():
        streamed = apply_head(loaded.model, loaded.adapter, hidden[0], CPU).float()
    torch.testing.assert_close(streamed, logits(loaded.model, ids), rtol=1e-5, atol=1e-5)


@params()
@pytest.mark.parametrize("method", ["AWQ", "SmoothQuant"])
def test_scale_folding_keeps_the_function(spec, folder, method):
    if method.lower() in spec.skip:
        pytest.skip(spec.skip[method.lower()])
    reference = load_model(ModelSection(type="auto", path=str(folder), torch_dtype="float32")).model
    ids = ids_for(folder)
    expected = logits(reference, ids)
    if method == "AWQ":
        quant = w4("AWQ", spec, weight_clip=False)
    else:
        quant = {"method": "SmoothQuant", "weight": {"bit": 8, "granularity": "per_channel"}, "act": {"bit": 8},
                 "special": {"smooth_linear_producers": True}}
    result = run(spec, folder, quant)
    with quant_disabled(result.model):
        torch.testing.assert_close(logits(result.model, ids), expected, rtol=1e-4, atol=1e-4)


@params()
def test_rtn_runs(spec, folder):
    result = run(spec, folder, w4("RTN", spec))
    assert torch.isfinite(logits(result.model, ids_for(folder))).all()


@params()
def test_gptq_saves_fake_and_compressed_tensors(spec, folder, tmp_path):
    out = tmp_path / "out"
    save = {"save_fake": True, "save_path": str(out)}
    if "ct_export" not in spec.skip:
        save["save_vllm"] = True
    quant = dict(w4("GPTQ", spec))
    quant["weight"]["symmetric"] = True
    result = run(spec, folder, quant, save)
    ids = ids_for(folder)
    expected = logits(result.model, ids)
    auto = getattr(transformers, spec.auto_class)
    fake = auto.from_pretrained(out / "fake_quant_model", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(fake, ids), expected, rtol=1e-5, atol=1e-5)
    if "ct_export" in spec.skip:
        pytest.skip(spec.skip["ct_export"])
    from transformers import CompressedTensorsConfig

    ct = auto.from_pretrained(out / "vllm_quant_model", dtype=torch.float32,
                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    torch.testing.assert_close(logits(ct, ids), expected, rtol=1e-5, atol=1e-5)


def test_coverage_names_a_linear_the_declaration_misses(tiny_llama_dir):
    loaded = load_model(ModelSection(type="auto", path=str(tiny_llama_dir), torch_dtype="float32"))
    adapter = loaded.adapter
    groups = tuple(g for g in adapter.groups if "mlp.down_proj" not in g.linears)
    partial = dataclasses.replace(adapter, groups=groups)
    block = adapter.get_blocks(loaded.model)[0]
    assert uncovered(partial, block) == ["mlp.down_proj"]
    declared_float = dataclasses.replace(partial, float_linears=("mlp.down_proj",))
    assert uncovered(declared_float, block) == []
