"""QuaRot: the rotations keep every rotatable family's function, the others are refused by name, W4A4
after rotating beats RTN on a model with activation outliers, [QuaRot, GPTQ] runs through the runner,
and the online Hadamard is refused by plain checkpoints and written as a compressed-tensors transform."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build_tiny_model, tiny_config
from zoo import all_models

from llmc import compress, load_config
from llmc.config.schema import ModelSection
from llmc.errors import ConfigError, ModelError
from llmc.methods import get_methods
from llmc.methods.lifecycle import ModelContext
from llmc.methods.quarot import residual_rotation
from llmc.models import get_adapter, load_model
from llmc.pipeline import BlockwisePipeline, capture_block_inputs
from llmc.pipeline.blockwise import BlockContext
from llmc.quant import fake_quant_modules, quant_disabled
from llmc.quant.fake_linear import TransformedLinear
from llmc.quant.hadamard import OnlineHadamard, hadamard_matrix

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
CPU = torch.device("cpu")
W4A4 = {"weight": {"bit": 4, "granularity": "per_channel", "symmetric": False},
        "act": {"bit": 4, "symmetric": False, "granularity": "per_token"}}
REFUSED = {
    "bloom": "LayerNorm", "falcon": "LayerNorm", "falcon-sequential": "LayerNorm", "falcon-new-arch-1ln": "LayerNorm",
    "falcon-new-arch": "no 'input_layernorm'", "gpt_bigcode": "LayerNorm", "gpt_bigcode-mha": "LayerNorm",
    "opt": "LayerNorm", "phi": "LayerNorm", "stablelm": "LayerNorm", "stablelm-parallel": "LayerNorm",
    "starcoder2": "LayerNorm", "gemma2": "post_attention_layernorm", "gemma3_text": "post_attention_layernorm",
}
NO_HEAD_ROTATION = {"phi3", "minicpm3"}  # fused qkv / MLA: attn_v is not a plain value projection
FAMILIES = {m.id: m for m in all_models()}
ROTATABLE = sorted(set(FAMILIES) - set(REFUSED))
_FOLDERS: dict[str, Path] = {}


def quarot(online: bool = True, method: str | list = "QuaRot"):
    special = {"online_rotate": online} if method == "QuaRot" else {"QuaRot": {"online_rotate": online}}
    cfg = load_config({"model": {"path": "unused"}, "quant": {"method": method, **W4A4, "special": special}})
    return get_methods(cfg.quant)


def family_folder(family: str, tmp_path_factory, tokenizer) -> Path:
    """The zoo's tiny model with random norm weights too (a norm folded wrongly shows in the logits)."""
    if family not in _FOLDERS:
        spec = FAMILIES[family]
        torch.manual_seed(0)
        config = spec.config(len(tokenizer))
        model = spec.build(config) if spec.build else getattr(transformers, spec.auto_class).from_config(
            config, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.08)
                elif "norm" in name and name.endswith("weight"):
                    p.normal_(1.0, 0.3)
        path = tmp_path_factory.mktemp(f"quarot-{family}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        _FOLDERS[family] = path
    return _FOLDERS[family]


def load(folder: Path):
    loaded = load_model(ModelSection(type="auto", path=str(folder), torch_dtype="float32"))
    return loaded.model, loaded.adapter


def ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


def scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ROTATABLE)
def test_rotation_keeps_the_logits(family, tmp_path_factory, tiny_tokenizer):
    model, adapter = load(family_folder(family, tmp_path_factory, tiny_tokenizer))
    tokens = ids()
    expected = logits(model, tokens)
    keys = set(model.state_dict())
    embedding = adapter.role(model, "embedding").weight.detach().clone()
    projector = dict(model.named_modules()).get("model.multi_modal_projector")
    features = None if projector is None else torch.randn(3, projector.linear_1.in_features,
                                                          generator=torch.Generator().manual_seed(2))
    projected = projector(features).detach() if projector is not None else None
    mctx = ModelContext(model, adapter, seed=7)
    quarot()[0].prepare_model(mctx)

    assert scaled_diff(logits(model, tokens), expected) < 1e-4
    q = residual_rotation(embedding.shape[1], "hadamard", 7).float()
    torch.testing.assert_close(adapter.role(model, "embedding").weight, embedding @ q, rtol=1e-5, atol=1e-5)
    if projector is not None:  # LLaVA: image features enter the stream rotated like the embeddings
        torch.testing.assert_close(projector(features), projected @ q, rtol=1e-4, atol=1e-5)
    assert set(model.state_dict()) == keys
    blocks = adapter.get_blocks(model)
    roles = adapter.block_roles
    for block in blocks:
        for norm in (roles.attn_norm, roles.mlp_norm):
            if norm:
                assert torch.equal(block.get_submodule(norm).weight, torch.ones_like(block.get_submodule(norm).weight))
    outs = [m for block in blocks for n, m in block.named_modules() if isinstance(m, TransformedLinear)]
    assert outs and all(isinstance(m.input_transform, OnlineHadamard) for m in outs)
    rotated = mctx.results["QuaRot"]["heads_rotated_blocks"]
    assert rotated == (0 if family in NO_HEAD_ROTATION else len(blocks))


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_families_that_cannot_be_rotated_are_refused_by_name(family, tmp_path_factory, tiny_tokenizer):
    model, adapter = load(family_folder(family, tmp_path_factory, tiny_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=f"^QuaRot cannot rotate {adapter.name}: .*{REFUSED[family]}"):
        quarot()[0].prepare_model(ModelContext(model, adapter))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any change


def test_an_adapter_without_roles_is_refused(tiny_llama_dir):
    model, adapter = load(tiny_llama_dir)
    bare = dataclasses.replace(adapter, roles=None)
    with pytest.raises(ModelError, match="QuaRot cannot rotate Llama: its adapter declares no roles"):
        quarot()[0].prepare_model(ModelContext(model, bare))


def test_prepare_is_deterministic_from_the_seed(tiny_llama_dir):
    states = []
    for seed in (3, 3, 4):
        model, adapter = load(tiny_llama_dir)
        quarot(method=["QuaRot", "GPTQ"])[0].prepare_model(ModelContext(model, adapter, seed=seed))
        states.append(model.state_dict())
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert not torch.equal(states[0]["model.embed_tokens.weight"], states[2]["model.embed_tokens.weight"])


def outlier_model(vocab: int):
    """Tiny Llama whose activations have outlier channels that small weights compensate, as in real
    LLMs: norm weights x30 with their readers' columns / 30, and up_proj rows x30 with down_proj's
    columns / 30 (the float function is unchanged; per-token 4-bit activations lose the other channels)."""
    model = build_tiny_model("llama", vocab, seed=3)
    adapter = get_adapter("auto", model.config.model_type)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02, generator=gen)
        for block in adapter.get_blocks(model):
            for norm, owner, readers in ((block.input_layernorm, block.self_attn, ("q_proj", "k_proj", "v_proj")),
                                         (block.post_attention_layernorm, block.mlp, ("gate_proj", "up_proj"))):
                ch = torch.randperm(64, generator=gen)[:3]
                norm.weight[ch] *= 30
                for r in readers:
                    getattr(owner, r).weight[:, ch] /= 30
            ch = torch.randperm(128, generator=gen)[:4]
            block.mlp.up_proj.weight[ch] *= 30
            block.mlp.down_proj.weight[:, ch] /= 30
    return model, adapter


def quantize(model, adapter, methods) -> None:
    for m in methods:
        m.prepare_model(ModelContext(model, adapter, seed=0))

    def process(ctx: BlockContext) -> None:
        for m in methods:
            ctx.targets = adapter.block_linear_names(ctx.block)
            m.process_block(ctx)

    BlockwisePipeline(model, adapter, CPU, progress=False).run(None, process)


def down_proj_outlier_ratio(model) -> float:
    seen = []
    module = model.model.layers[0].mlp.down_proj
    handle = module.register_forward_hook(
        lambda m, a, _o: seen.append(m.input_transform(a[0]) if m.input_transform is not None else a[0]))
    with quant_disabled(model), torch.no_grad():
        model(ids())
    handle.remove()
    x = seen[0].abs().reshape(-1, seen[0].shape[-1])
    return float((x.amax(dim=1) / x.mean(dim=1)).mean())


def test_w4a4_after_rotation_beats_rtn_on_activation_outliers(tiny_tokenizer):
    base, adapter = outlier_model(len(tiny_tokenizer))
    tokens = torch.randint(3, len(tiny_tokenizer), (4, 48), generator=torch.Generator().manual_seed(5))
    expected = logits(base, tokens)
    errors, ratios = {}, {}
    for name, methods in (("RTN", get_methods(load_config({"model": {"path": "x"}, "quant": {"method": "RTN", **W4A4}})
                                              .quant)),
                          ("QuaRot", quarot()), ("QuaRot-offline", quarot(online=False))):
        model = copy.deepcopy(base)
        quantize(model, adapter, methods)
        assert len(fake_quant_modules(model)) == 3 * 7
        errors[name] = float((logits(model, tokens) - expected).norm() / expected.norm())
        ratios[name] = down_proj_outlier_ratio(model)
    assert errors["QuaRot"] < errors["RTN"] / 2.5, errors
    # per token max / mean |x| into down_proj: the online Hadamard spreads the outlier channels
    assert ratios["RTN"] > 20 and ratios["QuaRot-offline"] > 20 and ratios["QuaRot"] < 5, ratios


def run(folder: Path, quant: dict, save: dict | None = None, eval_pos=None):
    cfg = tiny_config(folder, quant=quant)
    cfg["calib"].update(n_samples=4, seq_len=32, bs=2)
    if eval_pos:
        cfg["eval"].update(eval_pos=eval_pos, max_windows=2)
    else:
        del cfg["eval"]
    if save:
        cfg["save"] = save
    return compress(load_config(cfg), progress=False)


def test_quarot_alone_keeps_the_float_model_and_quantizes_w4a4(tiny_llama_dir):
    result = run(tiny_llama_dir, {"method": "QuaRot", **W4A4}, eval_pos=["pretrain", "transformed", "fake_quant"])
    wrapped = dict(fake_quant_modules(result.model))
    assert len(wrapped) == 3 * 7 and all(m.act_quantizer is not None and m.act_quantizer.bit == 4
                                         for m in wrapped.values())
    assert result.ppl("transformed") == pytest.approx(result.ppl("pretrain"), rel=1e-5)
    assert result.ppl("fake_quant") != result.ppl("pretrain")


def test_quarot_gptq_runs_end_to_end(tiny_llama_dir):
    result = run(tiny_llama_dir, {"method": ["QuaRot", "GPTQ"], **W4A4, "special": {"GPTQ": {"blocksize": 32}}},
                 eval_pos=["pretrain", "fake_quant"])
    wrapped = dict(fake_quant_modules(result.model))
    assert len(wrapped) == 3 * 7 and all(m.act_quantizer is not None for m in wrapped.values())
    downs = [m for n, m in wrapped.items() if n.endswith("down_proj")]
    assert len(downs) == 3 and all(isinstance(m.input_transform, OnlineHadamard) for m in downs)
    assert result.model.model.layers[0].input_layernorm.weight.eq(1).all()  # rotated before GPTQ saw the blocks
    assert 0 < result.ppl("fake_quant") < 2 * result.ppl("pretrain")


def test_methods_observe_the_input_a_transformed_linear_multiplies(tiny_llama_dir):
    model, adapter = load(tiny_llama_dir)
    quarot(method=["QuaRot", "GPTQ"])[0].prepare_model(ModelContext(model, adapter))
    inputs = capture_block_inputs(model, adapter, [{"input_ids": ids(), "attention_mask": None}], CPU)
    block = adapter.get_blocks(model)[0]
    ctx = BlockContext(0, block, adapter, inputs, CPU, adapter.block_linear_names(block))
    seen, multiplied = [], []
    handle = block.mlp.down_proj.input_transform.register_forward_hook(lambda _m, _a, out: multiplied.append(out))
    with ctx.hook_inputs(["mlp.down_proj"], lambda _n, x: seen.append(x)):
        ctx.forward_until("mlp.down_proj")
    handle.remove()
    torch.testing.assert_close(seen[0], multiplied[0])


def test_gptq_after_rotation_beats_rtn_after_rotation(tiny_tokenizer):
    base, adapter = outlier_model(len(tiny_tokenizer))
    tokens = torch.randint(3, len(tiny_tokenizer), (4, 48), generator=torch.Generator().manual_seed(5))
    calib = torch.randint(3, len(tiny_tokenizer), (16, 64), generator=torch.Generator().manual_seed(9))
    expected = logits(base, tokens)
    errors = {}
    for second in ("RTN", "GPTQ"):
        model = copy.deepcopy(base)
        methods = get_methods(load_config({"model": {"path": "x"}, "quant": {
            "method": ["QuaRot", second], "weight": W4A4["weight"]}}).quant)
        methods[0].prepare_model(ModelContext(model, adapter, seed=0))
        inputs = capture_block_inputs(model, adapter, [{"input_ids": calib[i : i + 4], "attention_mask": None}
                                                       for i in range(0, 16, 4)], CPU)

        def process(ctx: BlockContext, methods=methods) -> None:
            for m in methods:
                ctx.targets = adapter.block_linear_names(ctx.block)
                m.process_block(ctx)

        BlockwisePipeline(model, adapter, CPU, progress=False, quant_out=True).run(inputs, process)
        errors[second] = float((logits(model, tokens) - expected).norm() / expected.norm())
    assert errors["GPTQ"] < errors["RTN"], errors


def test_scale_folding_after_rotation_keeps_the_function(tiny_llama_dir):
    result = run(tiny_llama_dir, {"method": ["QuaRot", "SmoothQuant"], "weight": {"bit": 8, "granularity":
                 "per_channel", "symmetric": True}, "act": {"bit": 8},
                 "special": {"SmoothQuant": {"smooth_linear_producers": True}}}, eval_pos=["pretrain", "transformed"])
    assert result.ppl("transformed") == pytest.approx(result.ppl("pretrain"), rel=1e-4)


def test_tied_head_is_untied_and_the_rotated_model_saves(tmp_path, tiny_tokenizer):
    model = build_tiny_model("llama", len(tiny_tokenizer))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    tiny_tokenizer.save_pretrained(tmp_path / "tied")
    out = tmp_path / "out"
    result = run(tmp_path / "tied", {"method": "QuaRot", "weight": {"bit": 8, "granularity": "per_channel"},
                                     "special": {"online_rotate": False}},
                 save={"save_trans": True, "save_path": str(out)})
    m = result.model
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "transformed_model", dtype=torch.float32)
    assert json.loads((out / "transformed_model" / "config.json").read_text())["tie_word_embeddings"] is False
    with quant_disabled(m):
        torch.testing.assert_close(logits(reloaded, ids()), logits(m, ids()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag", ["save_trans", "save_fake", "save_autoawq", "save_mlcllm", "save_gptq"])
@pytest.mark.parametrize("method", ["QuaRot", ["QuaRot", "GPTQ"]], ids=["alone", "composed"])
def test_online_rotation_is_refused_by_plain_checkpoints(flag, method, tmp_path):
    cfg = {"model": {"path": str(tmp_path / "no-model")},
           "quant": {"method": method, "weight": {"bit": 4, "group_size": 32}},
           "save": {flag: True, "save_path": str(tmp_path / "out")}}
    key = "quant.special" if method == "QuaRot" else "quant.special.QuaRot"
    with pytest.raises(ConfigError, match=rf"save.{flag}: QuaRot online_rotate: true puts a Hadamard transform before "
                                          rf"down_proj that .* cannot carry; set {key}.online_rotate: false"):
        compress(load_config(cfg), progress=False)  # before the (missing) model is looked at
    assert not (tmp_path / "out").exists()


def ct_dense_weights(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = load_file(folder / "model.safetensors")
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    dense = {}
    for m in {k.rpartition(".")[0] for k in state if k.endswith(".weight_scale")}:
        local = {k[len(m) + 1:]: v for k, v in state.items() if k.startswith(m + ".") and "." not in k[len(m) + 1:]}
        dense[m] = compressor.decompress(local, scheme)["weight"]
    return qc, state, dense


@pytest.mark.parametrize("intermediate", [128, 96])
def test_save_vllm_carries_the_online_hadamard_as_a_transform(intermediate, tmp_path, tiny_tokenizer):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=intermediate, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    result = run(tmp_path / "m", {"method": ["QuaRot", "RTN"], "weight": {"bit": 4, "granularity": "per_channel",
                                                                         "symmetric": True}},
                 save={"save_vllm": True, "save_path": str(out)})
    folder = out / "vllm_quant_model"
    qc, state, dense = ct_dense_weights(folder)
    groups = qc["transform_config"]["config_groups"]
    assert list(groups) == ["online_hadamard"]
    scheme = groups["online_hadamard"]
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert scheme["type"] == ("hadamard" if intermediate == 128 else "random-hadamard")
    assert scheme["apply"] == [{"targets": downs, "location": "input", "inverse": False, "ignore": []}]
    stored = state[f"{downs[0]}.online_hadamard_input.weight"]
    assert torch.equal(stored.double(), hadamard_matrix(intermediate))
    for name, module in fake_quant_modules(result.model):  # the rotated, quantized weights, bit for bit
        torch.testing.assert_close(dense[name].float(), module.fake_weight().detach().float(), rtol=0, atol=0)
    # compressed-tensors' own transform semantics on the reloaded weights give llmc's logits
    from transformers import CompressedTensorsConfig

    ct = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    apply_transform_config(ct, TransformConfig.model_validate(qc["transform_config"]))
    with torch.no_grad():
        for name in downs:  # vLLM loads the stored matrix; compressed-tensors' random-hadamard would draw its own
            ct.get_submodule(f"{name}.online_hadamard_input").weight.copy_(stored)
    torch.testing.assert_close(logits(ct, ids()), logits(result.model, ids()), rtol=1e-4, atol=1e-4)


def test_save_vllm_with_online_rotation_refuses_moe_experts(tmp_path_factory, tiny_tokenizer):
    model, adapter = load(family_folder("mixtral", tmp_path_factory, tiny_tokenizer))
    method = quarot(method=["QuaRot", "RTN"])[0]
    assert method.export_refusal(["save_vllm"]) is None
    with pytest.raises(ConfigError, match="save.save_vllm: QuaRot online_rotate: true on Mixtral: .*MoE experts"):
        method.prepare_model(ModelContext(model, adapter))


def test_bad_special_keys():
    with pytest.raises(ConfigError, match="rotate_mode"):
        get_methods(load_config({"model": {"path": "x"}, "quant": {"method": "QuaRot",
                                                                    "special": {"rotate_mode": "givens"}}}).quant)
    with pytest.raises(ConfigError, match="did you mean 'online_rotate'"):
        get_methods(load_config({"model": {"path": "x"}, "quant": {"method": "Quarot",
                                                                    "special": {"online_rotation": True}}}).quant)
