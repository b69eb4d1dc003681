"""Remote-code checkpoints converted to Llama on load (llmc/models/convert): InternLM2 and MiniCPM.

Tiny random checkpoints are written in each model's published layout (config.json with its
`model_type` and `auto_map`, the published tensor names, a tokenizer); no remote code exists
anywhere. Each converted model's logits must equal a direct torch implementation of the original
architecture's forward pass (written here from its published math) to 1e-5 in float32; llmc's
pipeline (RTN W4) must run on it and save ordinary Llama folders; `model.type` auto and the
explicit names must both work; an unknown remote-code architecture must stay a one-line error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from llmc import compress, load_config
from llmc.cli import main
from llmc.config.schema import ModelSection
from llmc.errors import ModelError
from llmc.models import load_model

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
GROUPS = HEADS // KV_HEADS
RTN_W4 = {"method": "RTN", "weight": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}}


# ---------------------------------------------------------------- published layouts


def _weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors: matrices ~ N(0, 0.08) (visible quantization error), norms ~ 1, biases small."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            out[name] = 0.05 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.08 * torch.randn(shape, generator=gen)
    return out


def internlm2_state(vocab: int, bias: bool) -> dict[str, torch.Tensor]:
    shapes: dict[str, tuple[int, ...]] = {"model.tok_embeddings.weight": (vocab, HIDDEN)}
    qkv_rows = KV_HEADS * (GROUPS + 2) * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "attention_norm.weight"] = (HIDDEN,)
        shapes[p + "attention.wqkv.weight"] = (qkv_rows, HIDDEN)
        shapes[p + "attention.wo.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        if bias:
            shapes[p + "attention.wqkv.bias"] = (qkv_rows,)
            shapes[p + "attention.wo.bias"] = (HIDDEN,)
        shapes[p + "ffn_norm.weight"] = (HIDDEN,)
        shapes[p + "feed_forward.w1.weight"] = (INTER, HIDDEN)
        shapes[p + "feed_forward.w3.weight"] = (INTER, HIDDEN)
        shapes[p + "feed_forward.w2.weight"] = (HIDDEN, INTER)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["output.weight"] = (vocab, HIDDEN)
    return _weights(shapes, seed=1)


def internlm2_config(vocab: int, bias: bool, rope_scaling: dict | None) -> dict:
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "model_type": "internlm2",
        "attn_implementation": "eager",
        "bias": bias,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": INTER,
        "initializer_range": 0.02,
        "max_position_embeddings": 256,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_scaling": rope_scaling,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }


MINICPM_SCALES = {"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16}


def minicpm_state(vocab: int) -> dict[str, torch.Tensor]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
    shapes["model.norm.weight"] = (HIDDEN,)
    return _weights(shapes, seed=2)  # tied: no lm_head tensor, as in MiniCPM-2B


def minicpm_config(vocab: int) -> dict:
    return {
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModel": "modeling_minicpm.MiniCPMModel",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
        },
        "model_type": "minicpm",
        "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": INTER,
        "initializer_range": 0.1,
        "max_position_embeddings": 256,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
        **MINICPM_SCALES,
    }


def write_folder(folder: Path, config: dict, state: dict[str, torch.Tensor], tokenizer, fmt: str,
                 tokenizer_config: dict | None = None) -> Path:
    """config.json, the weights (2 safetensors shards with an index, or one pytorch_model.bin) and
    the tokenizer (tokenizer_config.json patched as the published one, e.g. a remote-code class)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if fmt == "safetensors":
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, keys in shards.items():
            save_file({k: state[k].contiguous() for k in keys}, str(folder / file))
        index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    else:
        torch.save(state, folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    if tokenizer_config:
        path = folder / "tokenizer_config.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(tokenizer_config)
        path.write_text(json.dumps(data), encoding="utf-8")
    return folder


INTERNLM2_TOKENIZER = {  # as published: a remote-code tokenizer class
    "tokenizer_class": "InternLM2Tokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                   "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
}
INTERNLM2_VARIANTS = {"plain": (False, None), "bias-linear-rope": (True, {"type": "linear", "factor": 2.0})}


@pytest.fixture(scope="module")
def internlm2_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, tuple[Path, dict, dict]]:
    root = tmp_path_factory.mktemp("internlm2")
    out = {}
    for name, (bias, rope_scaling) in INTERNLM2_VARIANTS.items():
        config = internlm2_config(len(tiny_tokenizer), bias, rope_scaling)
        state = internlm2_state(len(tiny_tokenizer), bias)
        folder = write_folder(root / name, config, state, tiny_tokenizer, "safetensors", INTERNLM2_TOKENIZER)
        out[name] = (folder, config, state)
    return out


@pytest.fixture(scope="module")
def minicpm_dir(tmp_path_factory, tiny_tokenizer) -> tuple[Path, dict, dict]:
    config = minicpm_config(len(tiny_tokenizer))
    state = minicpm_state(len(tiny_tokenizer))
    folder = write_folder(tmp_path_factory.mktemp("minicpm") / "minicpm", config, state, tiny_tokenizer, "bin")
    return folder, config, state


# ---------------------------------------------------------------- reference forward passes


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, theta: float, linear_factor: float = 1.0) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of x [batch, heads, seq, head_dim]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    positions = torch.arange(x.shape[-2], dtype=torch.float32) / linear_factor
    emb = torch.cat([torch.outer(positions, inv_freq)] * 2, dim=-1)
    rotated = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [b, H, s, d]; k, v [b, KV, s, d], query head h reads kv head h // (H / KV)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    seq = q.shape[-2]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def internlm2_reference(sd: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2ForCausalLM's forward (modeling_internlm2.py), from the published tensors."""
    b, s = ids.shape
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    factor = (cfg["rope_scaling"] or {}).get("factor", 1.0)
    h = sd["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, sd[p + "attention_norm.weight"], eps)
        qkv = F.linear(x, sd[p + "attention.wqkv.weight"], sd.get(p + "attention.wqkv.bias"))
        # rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + groups, d=head_dim)
        qkv = qkv.view(b, s, KV_HEADS, GROUPS + 2, HEAD_DIM)
        q = qkv[..., :GROUPS, :].reshape(b, s, KV_HEADS * GROUPS, HEAD_DIM)  # "b q h gs d -> b q (h gs) d"
        k, v = qkv[..., -2, :], qkv[..., -1, :]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, theta, factor), rope(k, theta, factor)
        o = causal_attention(q, k, v).transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM)
        h = h + F.linear(o, sd[p + "attention.wo.weight"], sd.get(p + "attention.wo.bias"))
        x = rms_norm(h, sd[p + "ffn_norm.weight"], eps)
        mlp = F.silu(F.linear(x, sd[p + "feed_forward.w1.weight"])) * F.linear(x, sd[p + "feed_forward.w3.weight"])
        h = h + F.linear(mlp, sd[p + "feed_forward.w2.weight"])
    return F.linear(rms_norm(h, sd["model.norm.weight"], eps), sd["output.weight"])


def minicpm_reference(sd: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """MiniCPMForCausalLM's forward (modeling_minicpm.py): Llama plus scale_emb, scale_depth / sqrt(L)
    on each residual branch, and the final hidden states divided by hidden_size / dim_model_base."""
    b, s = ids.shape
    eps, theta, layers = cfg["rms_norm_eps"], cfg["rope_theta"], cfg["num_hidden_layers"]
    branch = cfg["scale_depth"] / math.sqrt(layers)
    h = sd["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    for i in range(layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
        q = F.linear(x, sd[p + "self_attn.q_proj.weight"]).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
        k = F.linear(x, sd[p + "self_attn.k_proj.weight"]).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = F.linear(x, sd[p + "self_attn.v_proj.weight"]).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
        o = causal_attention(rope(q, theta), rope(k, theta), v).transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM)
        h = h + F.linear(o, sd[p + "self_attn.o_proj.weight"]) * branch
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        mlp = F.silu(F.linear(x, sd[p + "mlp.gate_proj.weight"])) * F.linear(x, sd[p + "mlp.up_proj.weight"])
        h = h + F.linear(mlp, sd[p + "mlp.down_proj.weight"]) * branch
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])  # tied
    hidden = rms_norm(h, sd["model.norm.weight"], eps)
    return F.linear(hidden / (cfg["hidden_size"] / cfg["dim_model_base"]), head)


def without_tokenizer_json(folder: Path, dest: Path) -> Path:
    """A copy of the checkpoint folder (symlinks) less its tokenizer.json."""
    dest.mkdir()
    for file in folder.iterdir():
        if file.name != "tokenizer.json":
            (dest / file.name).symlink_to(file)
    return dest


def sample_ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------- converted logits = original logits


@pytest.mark.parametrize("variant", list(INTERNLM2_VARIANTS))
@pytest.mark.parametrize("model_type", ["auto", "InternLM2"])
def test_internlm2_logits_match_reference(internlm2_dirs, variant, model_type):
    folder, config, state = internlm2_dirs[variant]
    loaded = load_model(ModelSection(type=model_type, path=str(folder), torch_dtype="float32"))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.adapter.name == ("Llama" if model_type == "auto" else "InternLM2")
    assert loaded.model.config.num_key_value_heads == KV_HEADS
    ids = sample_ids(config["vocab_size"])
    reference = internlm2_reference(state, config, ids)
    torch.testing.assert_close(logits_of(loaded.model, ids), reference, atol=1e-5, rtol=0)
    assert reference.std() > 0.1  # not flat logits
    # The tokenizer (a remote-code class in tokenizer_config.json) was read from tokenizer.json.
    assert loaded.tokenizer("the river")["input_ids"]


@pytest.mark.parametrize("model_type", ["auto", "MiniCPM"])
def test_minicpm_logits_match_reference(minicpm_dir, model_type):
    folder, config, state = minicpm_dir
    loaded = load_model(ModelSection(type=model_type, path=str(folder), torch_dtype="float32"))
    model = loaded.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert loaded.adapter.name == ("Llama" if model_type == "auto" else "MiniCPM")
    # The tied head was untied: it keeps the unscaled embedding (times the head factor).
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    embed = state["model.embed_tokens.weight"]
    torch.testing.assert_close(model.model.embed_tokens.weight, embed * 12)
    torch.testing.assert_close(model.lm_head.weight, embed * 16 / HIDDEN)
    ids = sample_ids(config["vocab_size"])
    reference = minicpm_reference(state, config, ids)
    torch.testing.assert_close(logits_of(model, ids), reference, atol=1e-5, rtol=0)
    assert reference.std() > 0.05


def test_checkpoint_dtype_is_kept_under_auto(minicpm_dir):
    folder, _config, _state = minicpm_dir
    loaded = load_model(ModelSection(type="auto", path=str(folder), torch_dtype="auto"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16  # config.json's torch_dtype


def test_minicpm_without_model_type_is_found_by_auto_map(tmp_path, minicpm_dir, tiny_tokenizer):
    """Early MiniCPM checkpoints name their config class only through auto_map."""
    _folder, config, state = minicpm_dir
    config = {k: v for k, v in config.items() if k != "model_type"}
    folder = write_folder(tmp_path / "early-minicpm", config, state, tiny_tokenizer, "safetensors")
    loaded = load_model(ModelSection(type="auto", path=str(folder), torch_dtype="float32"))
    ids = sample_ids(config["vocab_size"])
    torch.testing.assert_close(logits_of(loaded.model, ids), minicpm_reference(state, config, ids),
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the pipeline, end to end


@pytest.mark.parametrize("name", ["internlm2", "minicpm"])
def test_rtn_w4_end_to_end(tmp_path, name, internlm2_dirs, minicpm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, config, state = internlm2_dirs["plain"] if name == "internlm2" else minicpm_dir
    reference = internlm2_reference if name == "internlm2" else minicpm_reference
    out = tmp_path / "out"
    cfg = tiny_config(folder, quant=RTN_W4, save={"save_path": str(out), "save_trans": True, "save_fake": True})
    result = compress(load_config(cfg), progress=False)
    base, fake = result.ppl("pretrain"), result.ppl("fake_quant")
    assert math.isfinite(base) and math.isfinite(fake) and fake != base
    ids = sample_ids(config["vocab_size"])
    for sub in ("transformed_model", "fake_quant_model"):
        saved = out / sub
        written = json.loads((saved / "config.json").read_text(encoding="utf-8"))
        assert written["model_type"] == "llama" and "auto_map" not in written
        assert not list(saved.glob("*.py"))
        AutoTokenizer.from_pretrained(saved)  # no remote code needed
        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
        if sub == "transformed_model":  # RTN leaves the float weights as they were
            torch.testing.assert_close(logits_of(reloaded, ids), reference(state, config, ids), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(logits_of(reloaded, ids), logits_of(result.model, ids), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- errors stay one line


def run_cli(capsys, tmp_path: Path, cfg: dict) -> str:
    """Run the CLI; it must exit 2 with exactly one `llmc: error:` line and no traceback."""
    import yaml

    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    capsys.readouterr()
    code = main(["run", str(path), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("llmc: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def unknown_remote_dir(tmp_path, tiny_tokenizer) -> Path:
    folder = tmp_path / "remote-foo"
    folder.mkdir()
    config = {"model_type": "foo_remote", "architectures": ["FooForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_foo.FooConfig",
                           "AutoModelForCausalLM": "modeling_foo.FooForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_unknown_remote_code_architecture_is_unsupported(capsys, tmp_path, unknown_remote_dir):
    cfg = tiny_config(unknown_remote_dir, quant=RTN_W4, save={"save_path": str(tmp_path / "out"), "save_fake": True})
    line = run_cli(capsys, tmp_path, cfg)
    assert "unsupported architecture" in line and "'foo_remote'" in line
    assert "llama" in line and "internlm2" in line and "minicpm" in line  # supported and converted types
    assert not (tmp_path / "out").exists()


def test_unknown_remote_code_with_explicit_type(capsys, tmp_path, unknown_remote_dir):
    cfg = tiny_config(unknown_remote_dir, quant=RTN_W4)
    cfg["model"]["type"] = "Llama"
    line = run_cli(capsys, tmp_path, cfg)
    assert "'foo_remote'" in line and "remote code" in line and "model.trust_remote_code" in line


def test_tokenizer_that_needs_remote_code_names_the_fix(capsys, tmp_path, internlm2_dirs):
    """Only a remote-code tokenizer (no tokenizer.json, no tokenizer.model): one line naming model.tokenizer_path."""
    folder, _config, _state = internlm2_dirs["plain"]
    copy = without_tokenizer_json(folder, tmp_path / "internlm2-no-tokenizer")
    line = run_cli(capsys, tmp_path, tiny_config(copy, quant=RTN_W4))
    assert "tokenizer" in line and "without remote code" in line and "model.tokenizer_path" in line
    # ...and model.tokenizer_path is that fix.
    loaded = load_model(ModelSection(path=str(copy), tokenizer_path=str(folder), torch_dtype="float32"))
    assert loaded.tokenizer("the river")["input_ids"]


def test_unreadable_sentencepiece_model_is_one_line(tmp_path, internlm2_dirs):
    folder, _config, _state = internlm2_dirs["plain"]
    copy = without_tokenizer_json(folder, tmp_path / "internlm2-bad-sp")
    (copy / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelError) as info:
        load_model(ModelSection(path=str(copy), torch_dtype="float32"))
    message = str(info.value)
    assert "\n" not in message and "tokenizer.model" in message and "model.tokenizer_path" in message


def test_wrong_fused_qkv_width_is_one_line(tmp_path, internlm2_dirs, tiny_tokenizer):
    _folder, config, state = internlm2_dirs["plain"]
    config = {**config, "num_key_value_heads": 4}  # the tensors were written for 2 kv heads
    folder = write_folder(tmp_path / "bad", config, state, tiny_tokenizer, "safetensors")
    with pytest.raises(ModelError) as info:
        load_model(ModelSection(path=str(folder), torch_dtype="float32"))
    message = str(info.value)
    assert "\n" not in message and "wqkv" in message and "config.json" in message


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not (_installed("sentencepiece") and _installed("google.protobuf")),
                    reason="sentencepiece and protobuf not installed (needed to read a tokenizer.model)")
def test_sentencepiece_tokenizer_fallback(tmp_path, internlm2_dirs):
    """A folder with only a sentencepiece tokenizer.model (and a remote-code tokenizer class)."""
    import io

    import sentencepiece as spm

    from llmc.data import bundled_path, read_documents

    folder, _config, _state = internlm2_dirs["plain"]
    copy = without_tokenizer_json(folder, tmp_path / "internlm2-sp")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(read_documents(bundled_path("wikitext2", "calib"))[:300]), model_writer=model,
        vocab_size=380, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    (copy / "tokenizer.model").write_bytes(model.getvalue())
    loaded = load_model(ModelSection(path=str(copy), torch_dtype="float32"))
    ids = loaded.tokenizer("the river")["input_ids"]
    assert ids and max(ids) < 380
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() == "the river"
