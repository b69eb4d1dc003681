"""KV-cache quantization: keys and values land on their grids (static per-tensor / per-head scales are
the calibrated absmax / qmax; KIVI keys per channel, values per token), nothing else of the model
changes, an 8-bit cache keeps perplexity, a 2-bit KIVI cache costs more, and misuse is one line."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from llmc import compress
from llmc.config import load_config
from llmc.errors import ConfigError, ModelError
from llmc.methods.kvcache import KVCacheQuant, kv_quantizer
from llmc.models import get_adapter
from llmc.quant.fp8 import FP8_DTYPE, FP8_E4M3_MAX
from llmc.quant.kvcache import KVFakeQuant
from llmc.schedule import compress_batches

CPU = torch.device("cpu")
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1}


def _section(**kv):
    return load_config({"model": {"path": "unused"}, "quant": {"method": "RTN", "weight": W8, "kvcache": kv}}
                       ).quant.kvcache


def _kv(gran: str, head_dim: int = 4, group_size: int = -1, **kv) -> KVFakeQuant:
    sec = _section(**kv)
    return KVFakeQuant(kv_quantizer(sec, gran), gran, head_dim, group_size)


def _x(seed: int = 0, shape=(2, 10, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.linspace(0.5, 4.0, shape[-1])


def _calibrated(kv: KVFakeQuant, x: torch.Tensor) -> KVFakeQuant:
    kv.observing = True
    assert torch.equal(kv(x), x)  # observing leaves the tensor alone
    kv.freeze()
    return kv


def test_static_per_tensor_int8_scale_is_absmax_over_qmax():
    x = _x()
    kv = _calibrated(_kv("per_tensor", method="Naive", bit=8), x)
    assert kv.scale.numel() == 1
    assert torch.allclose(kv.scale.flatten(), x.abs().max().reshape(1) / 127)
    y = kv(_x(1))
    codes = y / kv.scale.flatten()
    assert torch.allclose(codes, codes.round(), atol=1e-3) and -128 <= codes.min() and codes.max() <= 127 + 1e-3
    assert not torch.equal(y, _x(1))


def test_static_per_head_scales_per_head():
    x = _x()
    kv = _calibrated(_kv("per_head", head_dim=4, method="Naive", bit=8, granularity="per_head"), x)
    heads = x.reshape(-1, 2, 4).abs().amax(dim=(0, 2))
    assert torch.allclose(kv.scale.flatten(), heads / 127)
    y = kv(x).reshape(-1, 2, 4)
    codes = y / kv.scale.flatten()[None, :, None]
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    codes_tensor = y / kv.scale.max()  # one scale for both heads would not fit the narrow head's grid
    assert not torch.allclose(codes_tensor, codes_tensor.round(), atol=1e-3)


def test_fp8_per_tensor_scale_and_grid():
    x = _x()
    kv = _calibrated(_kv("per_tensor", method="Naive", quant_type="float-quant", bit="e4m3"), x)
    assert torch.allclose(kv.scale.flatten(), x.abs().max().reshape(1) / FP8_E4M3_MAX)
    v = kv(x) / kv.scale.flatten()
    assert torch.allclose(v, v.to(FP8_DTYPE).float(), rtol=1e-5, atol=0)
    assert not torch.allclose(x / kv.scale.flatten(), (x / kv.scale.flatten()).to(FP8_DTYPE).float(), rtol=1e-5, atol=0)


def _distinct_per_row(t: torch.Tensor) -> int:
    return max(len(torch.unique(r)) for r in t)


def test_kivi_keys_per_channel_values_per_token():
    x = _x(shape=(2, 16, 8))
    keys = _kv("per_channel", head_dim=4, method="Kivi", bit=2)
    values = _kv("per_token", head_dim=4, method="Kivi", bit=2)
    assert not keys.static and not keys.quantizer.symmetric
    k, v = keys(x), values(x)
    # keys: every (sequence, channel) over its tokens takes at most 4 levels; tokens do not
    assert _distinct_per_row(k.transpose(1, 2).reshape(-1, 16)) <= 4
    assert _distinct_per_row(k.reshape(-1, 8)) > 4
    # values: every (token, head) takes at most 4 levels; channels over tokens do not
    assert _distinct_per_row(v.reshape(-1, 4)) <= 4
    assert _distinct_per_row(v.transpose(1, 2).reshape(-1, 16)) > 4
    # asymmetric min-max: each row's extremes are kept within half a step
    rows = x.transpose(1, 2).reshape(-1, 16)
    step = (rows.amax(1) - rows.amin(1)) / 3
    kr = k.transpose(1, 2).reshape(-1, 16)
    assert ((kr.amax(1) - rows.amax(1)).abs() <= step / 2 + 1e-5).all()


def test_kivi_key_groups_of_tokens():
    x = _x(shape=(1, 10, 4))
    k = _kv("per_channel", head_dim=4, group_size=4, method="Kivi", bit=2)(x)
    for start in (0, 4, 8):  # the partial last group too
        assert _distinct_per_row(k[0, start:start + 4].T) <= 4
    assert _distinct_per_row(k[0].T) > 4


def _tiny(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, get_adapter("auto", model.config.model_type)


def test_pipeline_calibrates_block_scales_and_leaves_weights(tiny_llama_dir):
    cfg = load_config(tiny_config(tiny_llama_dir, quant={"method": "RTN", "weight": W8,
                                                        "kvcache": {"granularity": "per_head"}}))
    model, adapter = _tiny(tiny_llama_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    seen = {}
    block0 = adapter.get_blocks(model)[0]
    handles = [block0.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(o))
               for n in ("self_attn.k_proj", "self_attn.v_proj")]
    with torch.no_grad():
        for i in (0, 2):
            model(ids[i:i + 2])
    for h in handles:
        h.remove()
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": None} for i in (0, 2)]
    compress_batches(cfg, model, adapter, [KVCacheQuant(cfg.quant.kvcache)], CPU, batches, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    hd = adapter.block_head_dim(block0)
    for name, outs in seen.items():
        out = torch.cat(outs)
        expect = out.reshape(-1, out.shape[-1] // hd, hd).abs().amax(dim=(0, 2)) / 127
        assert torch.allclose(block0.get_submodule(name).kv_quant.scale.flatten(), expect, rtol=1e-5)
    for block in adapter.get_blocks(model):
        for name in ("self_attn.k_proj", "self_attn.v_proj"):
            assert block.get_submodule(name).kv_quant.scale is not None


def test_perplexity_8bit_close_kivi_2bit_worse(tiny_llama_dir):
    def ppl(kvcache):
        quant = {"method": "RTN", "weight": W8, **({"kvcache": kvcache} if kvcache else {})}
        return compress(tiny_config(tiny_llama_dir, quant=quant), progress=False).ppl("fake_quant")

    base, int8 = ppl(None), ppl({"method": "Naive", "bit": 8})
    fp8 = ppl({"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_head"})
    kivi2 = ppl({"method": "Kivi", "bit": 2, "group_size": 32})
    assert int8 != base and abs(int8 / base - 1) < 0.01 and abs(fp8 / base - 1) < 0.01
    assert kivi2 > int8 * 1.001


def test_errors(tiny_opt_dir, tiny_llama_dir, tmp_path, monkeypatch):
    import llmc.runner

    def no_eval(*_a, **_k):
        raise AssertionError("evaluated before refusing")

    with monkeypatch.context() as m, pytest.raises(ModelError, match="attn_k"):  # refused before any evaluation
        m.setattr(llmc.runner, "evaluate_perplexity", no_eval)
        compress(tiny_config(tiny_opt_dir, quant={"method": "RTN", "weight": W8, "kvcache": {}}), progress=False)
    cfg = tiny_config(tiny_llama_dir, quant={"method": "RTN", "weight": W8, "kvcache": {}},
                      save={"save_vllm": True, "save_path": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match="save.save_vllm"):
        compress(cfg, progress=False)
    for bad, text in [({"method": "Kivi", "granularity": "per_head"}, "remove granularity"),
                      ({"quant_type": "float-quant", "bit": 8}, "e4m3"), ({"method": "Foo"}, "Naive")]:
        with pytest.raises(Exception, match=text):
            _section(**bad)


def test_transformed_runs_the_cache_in_float_and_a_saved_run_skips_checkpoints(tiny_llama_dir, tmp_path):
    import json

    quant = {"method": "RTN", "weight": W8, "kvcache": {"method": "Kivi", "bit": 2, "group_size": 32}}
    cfg = tiny_config(tiny_llama_dir, quant=quant, save={"save_path": str(tmp_path / "o")})
    cfg["eval"]["eval_pos"] = ["pretrain", "transformed", "fake_quant"]
    result = compress(cfg, progress=False)
    assert result.ppl("transformed") == pytest.approx(result.ppl("pretrain"), rel=1e-6)  # RTN leaves the weights
    assert result.ppl("fake_quant") > result.ppl("pretrain") * 1.001
    assert json.loads((tmp_path / "o" / "results.json").read_text())["resumed_after_block"] is None
    assert not list(tmp_path.glob(".o.llmc-resume*"))


# ---- keys after RoPE, and the compressed-tensors export of their scales --------------------------

FP8_KV = {"quant_type": "float-quant", "bit": "e4m3"}


def _fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE).float() * scale


def _rope_keys(model, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_proj's output as [batch, kv_heads, tokens, head_dim], the same keys after RoPE) of one layer."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[layer].self_attn
    seen = []
    handle = attn.k_proj.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model(ids)
    handle.remove()
    b, t = ids.shape
    k = seen[0].reshape(b, t, -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(k, torch.arange(t)[None].expand(b, t))
    return k, apply_rotary_pos_emb(k, k, cos, sin)[1]


def test_post_rope_cache_holds_fake_quant_of_rotated_keys(tiny_llama_dir):
    from transformers import DynamicCache

    quant = {"method": "RTN", "weight": W8, "kvcache": {**FP8_KV, "post_rope": True}}
    model = compress(tiny_config(tiny_llama_dir, quant=quant), progress=False).model
    attn = model.model.layers[1].self_attn
    assert not hasattr(attn.k_proj, "kv_quant")  # nothing quantized before RoPE
    scale = attn.kv_cache_quant.key.scale.flatten()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    k, rotated = _rope_keys(model, 1, ids)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    stored = cache.layers[1].keys  # what the attention handed its (real) cache
    assert torch.allclose(stored, _fp8_qdq(rotated, scale), atol=1e-6)
    assert not torch.allclose(stored, rotated, atol=1e-4)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = model.model.rotary_emb(k, torch.arange(24)[None].expand(2, 24))
    rope_of_quantized = apply_rotary_pos_emb(k, _fp8_qdq(k, scale), cos, sin)[1]
    assert not torch.allclose(stored, rope_of_quantized, atol=1e-4)  # quantized after RoPE, not before


def test_post_rope_scales_are_calibrated_on_rotated_keys(tiny_llama_dir):
    from transformers import DynamicCache

    cfg = load_config(tiny_config(tiny_llama_dir, quant={"method": "RTN", "weight": W8, "kvcache": {
        **FP8_KV, "granularity": "per_head", "post_rope": True}}))
    model, adapter = _tiny(tiny_llama_dir)
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    keys, pre = [], []
    for i in (0, 2):
        cache = DynamicCache(config=model.config)
        k, _ = _rope_keys(model, 0, ids[i:i + 2])
        with torch.no_grad():
            model(ids[i:i + 2], cache=cache, use_cache=True)
        keys.append(cache.layers[0].keys)
        pre.append(k)
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": None} for i in (0, 2)]
    compress_batches(cfg, model, adapter, [KVCacheQuant(cfg.quant.kvcache, post_rope=True)], CPU, batches,
                     progress=False)
    scale = model.model.layers[0].self_attn.kv_cache_quant.key.scale.flatten()
    assert torch.allclose(scale, torch.cat(keys).abs().amax(dim=(0, 2, 3)) / FP8_E4M3_MAX, rtol=1e-6)
    assert not torch.allclose(scale, torch.cat(pre).abs().amax(dim=(0, 2, 3)) / FP8_E4M3_MAX, rtol=1e-3)


def _export(model_dir, out, kvcache, key="save_vllm"):
    quant = {"method": "RTN", "weight": W8, "kvcache": kvcache}
    cfg = tiny_config(model_dir, quant=quant, save={key: True, "save_path": str(out)})
    del cfg["eval"]
    return compress(cfg, progress=False)


@pytest.mark.parametrize("granularity,strategy", [("per_tensor", "tensor"), ("per_head", "attn_head")])
def test_export_writes_kv_cache_scheme_and_calibrated_scales(tiny_llama_dir, tmp_path, granularity, strategy):
    import json

    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams
    from safetensors.torch import load_file

    result = _export(tiny_llama_dir, tmp_path / "o", {**FP8_KV, "granularity": granularity})
    folder = tmp_path / "o" / "vllm_quant_model"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = qc["kv_cache_scheme"]
    assert {k: scheme[k] for k in ("num_bits", "type", "strategy", "symmetric", "dynamic")} == {
        "num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    args = QuantizationConfig.model_validate(qc).kv_cache_scheme  # as compressed-tensors parses it
    assert args.strategy == strategy and args.type == "float" and args.num_bits == 8
    state = load_file(folder / "model.safetensors")
    cfg = result.model.config
    layers = result.model.model.layers
    assert sum(k.endswith(("k_scale", "v_scale")) for k in state) == 2 * len(layers)
    for i, layer in enumerate(layers):
        quant = layer.self_attn.kv_cache_quant
        for name, fq in (("k_scale", quant.key), ("v_scale", quant.value)):
            saved = state[f"model.layers.{i}.self_attn.{name}"]
            # the shape and dtype compressed-tensors itself gives the parameter it loads this into
            probe = torch.nn.Module()
            initialize_qparams(probe, name[0], args, observed_shape=(cfg.num_key_value_heads, None, cfg.head_dim),
                               observed_dtype=torch.float32, force_zero_point=False)
            assert saved.shape == getattr(probe, name).shape and saved.dtype == getattr(probe, name).dtype
            assert torch.equal(saved.flatten(), fq.scale.flatten())
    assert len(torch.unique(state["model.layers.0.self_attn.k_scale"])) == (1 if granularity == "per_tensor" else 2)


@pytest.mark.parametrize("kvcache,text", [
    ({"method": "Kivi", "bit": 2}, "Kivi"),
    ({"bit": 8}, "FP8 only"),
    ({**FP8_KV, "post_rope": False}, "post_rope"),
])
def test_export_refusals_are_one_line(tiny_llama_dir, tmp_path, kvcache, text):
    with pytest.raises(ConfigError, match=text) as err:
        _export(tiny_llama_dir, tmp_path / "o", kvcache, key="save_sgl")
    assert str(err.value).startswith("save.save_sgl: ") and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_other_formats_refuse_the_cache(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="save.save_fake does not carry") as err:
        _export(tiny_llama_dir, tmp_path / "o", FP8_KV, key="save_fake")
    assert "\n" not in str(err.value)


def test_post_rope_defaults():
    from llmc.methods.kvcache import kvcache_method

    def method(save, **kv):
        cfg = load_config({"model": {"path": "unused"}, "quant": {"method": "RTN", "weight": W8, "kvcache": kv},
                           "save": {**save, "save_path": "/tmp/unused"} if save else {}})
        return kvcache_method(cfg)

    assert not method({}).post_rope and method({}, post_rope=True).post_rope
    assert method({"save_vllm": True}, **FP8_KV).post_rope
