"""Config fuzzing: random dicts, YAML-dumped dicts and token-grammar YAML text either load into an
LlmcConfig or raise a one-line ConfigError -- never anything else."""

from __future__ import annotations

import copy
from pathlib import Path

from hypothesis import event, example, given
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from test_config import CONSTRUCTOR_CRASHES, FUZZ

from llmc.config import load_config
from llmc.config.schema import (
    ActQuantSection,
    BaseSection,
    CalibSection,
    EvalSection,
    IgnoredLayers,
    LlmcConfig,
    ModelSection,
    QuantSection,
    SaveSection,
    SparseSection,
    SparseWeightSection,
    WeightQuantSection,
)
from llmc.errors import ConfigError

# ---------------------------------------------------------------- fuzzing

SECTIONS: dict[str, type] = {
    "base": BaseSection, "model": ModelSection, "calib": CalibSection, "eval": EvalSection,
    "quant": QuantSection, "sparse": SparseSection, "save": SaveSection,
}
FIELD_NAMES = sorted(
    {n for m in (*SECTIONS.values(), WeightQuantSection, ActQuantSection, IgnoredLayers, SparseWeightSection)
     for n in m.model_fields}
)
ALL_KEYS = sorted(set(FIELD_NAMES) | set(SECTIONS))
PLAUSIBLE = [
    None, True, False, 0, 1, -1, 2, 3, 4, 8, 9, 16, 128, 2048, 0.5, float("nan"), float("inf"), "", "auto",
    "RTN", "Naive", "per_tensor", "per_channel", "per_group", "per_token", "minmax", "mse", "wikitext2", "c4",
    "pretrain", "fake_quant", "transformed", "float32", "cpu", "2-3", "some/path", [], ["pretrain"], [0, "2-3"], {},
]

scalars = st.one_of(
    st.sampled_from(PLAUSIBLE),
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=8), st.integers(-3, 3))
trees = st.recursive(
    scalars, lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=20,
)


VALID: dict[str, list] = {
    "seed": [0, 1, 42, None], "device": ["cpu", "auto", "cuda:1"], "act_cache": ["auto", "device", "cpu", "disk"],
    "type": ["auto", "Llama", "OPT", "Foo"], "path": ["m", "/x/y"],
    "tokenizer_path": [None, "tok"], "tokenizer_mode": ["fast", "slow"], "gguf_file": [None, "m.gguf"],
    "torch_dtype": ["auto", "float32", "bfloat16"], "trust_remote_code": [True, False],
    "allow_pickle": [True, False], "checkpoint": [True, False], "stream": [True, False], "act_cache_dir": [None, "cache"],
    "name": ["wikitext2", "c4", "pileval"], "download": [False, True],
    "n_samples": [1, 4, 128], "bs": [-1, 1, 4], "seq_len": [2, 64, 2048], "preproc": ["general", "padded_docs"],
    "text_key": ["text"], "eval_pos": [[], ["pretrain"], ["pretrain", "fake_quant", "transformed"]],
    "max_windows": [None, 1, 4], "inference_per_block": [True, False],
    "bit": [2, 3, 4, 8, "e4m3"], "symmetric": [True, False], "granularity": ["per_tensor", "per_channel", "per_group",
                                                                      "per_token"],
    "group_size": [-1, 32, 128], "calib_algo": ["minmax", "mse", "percentile", "learnable"],
    "partial_group": [True, False], "percentile": [99.0, 99.9, 100.0], "ste": [True],
    "sym_scale": ["qmax", "half_range"], "block_size": [128, 32],
    "static": [True, False], "block_ids": [[], [0, "2-3"], ["1"]], "layer_names": [[], ["mlp.down_proj"]],
    "speical_names": [[], ["model.layers.0.mlp.up_proj"]], "method": ["RTN", "Naive", "rtn", "GPTQ"],
    "special": [{}, {"x": 1}], "quant_out": [True, False],
    "save_trans": [True, False], "save_fake": [True, False], "save_path": [None, "out"], "overwrite": [True, False],
    "save_vllm": [True, False], "save_sgl": [True, False], "save_autoawq": [True, False],
    "save_mlcllm": [True, False], "save_gptq": [True, False], "quant_type": ["int-quant", "float-quant", "nvfp4", "mxfp4", "mxfp8"],
    "weight": [{}, {"bit": 3}], "act": [None, {}, {"static": True, "granularity": "per_tensor"}],
    "ignored_layers": [{}, {"block_ids": ["0-1"]}],
    "overrides": [[], [{"role": "mlp_out", "weight": {"bit": 8}}], [{"regex": "mlp.down_proj", "do_quant": False}]],
    "auto_scheme": [None, {"bits_per_weight": 3.5, "bits": [3, 4]}],
    "kvcache": [None, {}, {"method": "Kivi", "bit": 2}, {"quant_type": "float-quant", "granularity": "per_head"}],
    "moe_all_experts": [True, False], "moe_min_tokens": [0, 128],
    "sparsity": [None, 0.5, 0.0], "pattern": ["unstructured", "2:4", "4:8"], "layer_sparsity": [None, [0.5], "owl"],
    "owl_lambda": [0.08], "owl_m": [5.0], "n_prune_layers": [None, 1, 4], "sparsity_out": [None, True, False],
    "tasks": [[], ["piqa"], ["lambada_openai", "boolq"], ["nope"]], "num_fewshot": [None, 0, 5],
    "limit": [None, 1, 20, 0.5, 0], "tasks_bs": [1, 8], "tasks_local": ["auto", True, False],
    "round_zp": [None, True, False], "post_rope": [None, True, False],
}
SUBSECTIONS = {"weight": WeightQuantSection, "act": ActQuantSection, "ignored_layers": IgnoredLayers}


@st.composite
def section_dicts(draw, model: type, noise: int):
    """Valid values for the section's own keys; with `noise` percent chance each, junk or an unknown key."""
    fields = sorted(model.model_fields)
    out = {}
    for name in draw(st.lists(st.sampled_from(fields), max_size=len(fields), unique=True)):
        junk = draw(st.integers(0, 99)) < noise
        if junk:
            out[name] = draw(st.one_of(st.sampled_from(PLAUSIBLE), trees))
        elif name in SUBSECTIONS and model is QuantSection and draw(st.integers(0, 4)) > 0:
            out[name] = draw(section_dicts(SUBSECTIONS[name], noise))
        elif name == "weight" and model is SparseSection and draw(st.integers(0, 4)) > 0:
            out[name] = draw(section_dicts(SparseWeightSection, noise))
        elif model is SparseSection and name == "method":
            out[name] = draw(st.sampled_from(["Wanda", "SparseGPT", "Magnitude", "ShortGPT"]))
        elif model is ModelSection and name == "path":
            out[name] = "some/model"
        else:
            out[name] = draw(st.sampled_from(VALID[name]))
    if draw(st.integers(0, 99)) < noise:
        out[draw(keys)] = draw(scalars)
    return out


@st.composite
def config_dicts(draw):
    noise = draw(st.sampled_from([0, 0, 3, 10, 30]))
    raw: dict = {}
    if noise == 0 or draw(st.integers(0, 99)) >= noise:
        raw["model"] = {"path": "some/model"}
    for name, model in SECTIONS.items():
        if draw(st.booleans()):
            raw[name] = draw(trees) if draw(st.integers(0, 99)) < noise else draw(section_dicts(model, noise))
    if isinstance(raw.get("model"), dict) and draw(st.integers(0, 99)) >= noise:
        raw["model"].setdefault("path", "some/model")
    if draw(st.integers(0, 99)) < noise:
        raw[draw(keys)] = draw(trees)
    return raw


DOTTED = [f"{s}.{f}" for s, m in SECTIONS.items() for f in m.model_fields] + [
    f"quant.{s}.{f}" for s, m in SUBSECTIONS.items() for f in m.model_fields
]
override_values = st.one_of(
    st.sampled_from(["3", "[pretrain]", "per_channel", "", "{bit: 4}", "null", "-1", "x", "[", "'a", "{a: [1}"]),
    st.sampled_from(sorted({repr(v) for vs in VALID.values() for v in vs})),
    st.text(alphabet="abc013-_:[]{}', ", max_size=10),
)
overrides = st.lists(
    st.builds(
        lambda k, sep, v: f"{k}{sep}{v}",
        st.sampled_from(DOTTED) | st.lists(st.sampled_from(ALL_KEYS + ["x"]), min_size=1, max_size=3).map(".".join)
        | st.text(max_size=6),
        st.sampled_from(["="] * 8 + [" = ", "", ":"]),
        override_values,
    ),
    max_size=2,
)


def check_outcome(source, items=()) -> LlmcConfig | None:
    """Either an LlmcConfig or a one-line ConfigError; anything else fails the test."""
    try:
        cfg = load_config(source, items)
    except ConfigError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg and len(msg.splitlines()) == 1, msg
        if currently_in_test_context():
            event("ConfigError: " + msg.split(":")[0][:30])
        return None
    if currently_in_test_context():
        event("valid")
    assert isinstance(cfg, LlmcConfig)
    # A valid config survives a dump/load round trip unchanged.
    assert load_config(cfg.model_dump()) == cfg
    return cfg


@FUZZ
@given(config_dicts(), overrides | st.just([]))
def test_fuzz_dicts(raw, items):
    check_outcome(copy.deepcopy(raw), items)


@FUZZ
@given(config_dicts())
def test_fuzz_dicts_as_yaml(raw):
    """The same structures written as YAML text take the same path through the loader."""
    import yaml

    try:
        text = yaml.safe_dump(raw, allow_unicode=True)
    except yaml.YAMLError:
        return
    check_outcome(text + "\n")


# YAML-ish lines: keys, indentation, flow and block syntax, anchors, quotes, comments, documents.
TOKENS = [
    "", " ", "  ", "    ", "\t", ":", ": ", "- ", "-", "[", "]", "{", "}", ",", "&a ", "*a", "*b", "<<: ", "? ",
    "'", '"', "|", ">", "#", "---", "...", "%YAML 1.2", "!!str ", "!", "@", "`", "\\", "true", "null", "~",
    "42", "-1", "1e400", ".inf", "0x1F", "per_group", "RTN", "model", "path", "quant", "weight", "bit", "act",
    "save", "save_path", "eval_pos", "é", "\u2028", "\x85",
]
BUG_TOKENS = ["!!int ", "!!float ", "!!timestamp ", "2001-13-01"]


def yaml_texts(tokens: list[str]):
    line = st.lists(st.sampled_from(tokens), max_size=8).map("".join)
    body = st.lists(line, min_size=1, max_size=8).map("\n".join)
    prefix = st.sampled_from(["", "model: {path: m}\n", "model:\n  path: m\nquant:\n  "])
    return st.builds(lambda p, b: p + b + "\n", prefix, body)


@FUZZ
@given(yaml_texts(TOKENS))
@example("model: {path: m}\nquant: {weight: {bit: 9}}\n")
@example("model: &a {path: *a}\n")
@example("model: {path: m}\n? [a]\n: b\n")
@example("model: {path: m}\n\x00\n")
@example("model: {path: m}\nquant: !!python/object:os.system {}\n")
def test_fuzz_yaml_text(text):
    check_outcome(text)


@FUZZ
@given(yaml_texts(TOKENS + BUG_TOKENS))
@example(CONSTRUCTOR_CRASHES[0])
def test_fuzz_yaml_text_with_constructor_tags(text):
    check_outcome(text)


def test_outcomes_through_files(tmp_path):
    """A few fixed texts through the file path (same messages, with the file name)."""
    for i, text in enumerate(["model: {path: m}\n", "model: [\n", "- 1\n", "model: {path: m, x: 1}\n"]):
        file = Path(tmp_path) / f"c{i}.yml"
        file.write_text(text, encoding="utf-8")
        check_outcome(file)
