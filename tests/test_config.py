"""Config loading: sources, YAML anchors, --set overrides, one-line errors with did-you-mean, fuzzing."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from llmc.config import load_config
from llmc.config.schema import (
    ActQuantSection,
    BaseSection,
    CalibSection,
    EvalSection,
    IgnoredLayers,
    LlmcConfig,
    QuantSection,
    SaveSection,
    WeightQuantSection,
)
from llmc.errors import ConfigError, LlmcError

FUZZ = settings(derandomize=True, deadline=None, max_examples=300, suppress_health_check=list(HealthCheck))

LLMC_RTN = """\
base:
    seed: &seed 42
model:
    type: Llama
    path: /models/Llama-2-7b-hf
    tokenizer_mode: slow
    torch_dtype: auto
calib:
    name: pileval
    download: False
    path: /data/pileval
    n_samples: 128
    bs: -1
    seq_len: 512
    preproc: general
    seed: *seed
eval:
    eval_pos: [pretrain, transformed, fake_quant]
    name: [wikitext2, c4]
    download: False
    path: /data/eval
    seq_len: 2048
    bs: 1
    inference_per_block: False
quant:
    method: RTN
    weight:
        bit: 4
        symmetric: False
        granularity: per_channel
        group_size: -1
    act:
        bit: 8
        symmetric: True
        granularity: per_token
    ignored_layers:
        block_ids: [0, "2-3", 5-6]
        layer_names: ["mlp.down_proj"]
        speical_names: ["model.layers.1.self_attn.q_proj"]
save:
    save_trans: False
    save_fake: True
    save_path: /output/rtn_w4a8
"""


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg and len(msg.splitlines()) == 1, msg
    assert "Traceback" not in msg
    return msg


def minimal(**sections) -> dict:
    return {"model": {"path": "some/model"}, **sections}


# ---------------------------------------------------------------- sources


def test_full_llmc_rtn_config_validates():
    cfg = load_config(LLMC_RTN)
    assert isinstance(cfg, LlmcConfig)
    assert cfg.base.seed == 42 and cfg.calib.seed == 42 and cfg.calib_seed == 42
    assert cfg.model.type == "Llama" and cfg.model.tokenizer_mode == "slow"
    assert cfg.calib.bs == -1 and cfg.calib.name == "pileval"
    assert cfg.eval.eval_pos == ["pretrain", "transformed", "fake_quant"]
    assert cfg.eval.names == ["wikitext2", "c4"]
    w = cfg.quant.weight
    assert (w.bit, w.symmetric, w.granularity, w.group_size) == (4, False, "per_channel", -1)
    a = cfg.quant.act
    assert (a.bit, a.symmetric, a.granularity, a.static) == (8, True, "per_token", False)
    ign = cfg.quant.ignored_layers
    assert ign.block_ids == [0, "2-3", "5-6"]
    assert ign.blocks() == {0, 2, 3, 5, 6}
    assert ign.layer_names == ["mlp.down_proj"] and ign.speical_names == ["model.layers.1.self_attn.q_proj"]
    assert cfg.save.save_fake and cfg.save.save_path == "/output/rtn_w4a8" and not cfg.save.overwrite


@pytest.mark.parametrize(
    "block_ids,expected", [([], set()), ([3], {3}), (["4"], {4}), (["1-1"], {1}), ([0, "2-4", 9], {0, 2, 3, 4, 9})]
)
def test_ignored_block_ranges(block_ids, expected):
    assert IgnoredLayers(block_ids=block_ids).blocks() == expected


def test_sources_agree(tmp_path):
    file = tmp_path / "rtn.yml"
    file.write_text(LLMC_RTN, encoding="utf-8")
    other = tmp_path / "config.txt"  # any existing file is read, whatever its suffix
    other.write_text(LLMC_RTN, encoding="utf-8")
    import yaml

    from_dict = load_config(yaml.safe_load(LLMC_RTN))
    for source in (file, str(file), str(other), LLMC_RTN):
        assert load_config(source) == from_dict


def test_defaults_from_minimal_config():
    cfg = load_config("model: {path: some/model}")
    assert cfg.model.path == "some/model" and cfg.model.type == "auto"
    assert cfg.base == BaseSection() and cfg.save == SaveSection()
    assert cfg.calib is None and cfg.eval is None and cfg.quant is None
    assert cfg.calib_seed == cfg.base.seed == 42


def test_anchors_and_aliases():
    text = textwrap.dedent(
        """\
        base: {seed: &seed 7}
        model: {path: m}
        calib: {seed: *seed, n_samples: 8}
        common: &w {bit: 3, symmetric: true, granularity: per_group, group_size: 32}
        """
    )
    with pytest.raises(ConfigError, match="'common'"):
        load_config(text)  # the anchor holder must itself be a valid key...
    text = textwrap.dedent(
        """\
        base: {seed: &seed 7}
        model: {path: m}
        calib: {seed: *seed, n_samples: 8}
        quant:
            weight: &w {bit: 3, symmetric: true, granularity: per_group, group_size: 32}
            special: {copy: *w}
        eval:
            <<: {seq_len: 256, bs: 2}
            max_windows: 3
        """
    )
    cfg = load_config(text)  # ...anchors, aliases and merge keys then work anywhere
    assert cfg.base.seed == cfg.calib.seed == cfg.calib_seed == 7
    assert cfg.quant.weight == WeightQuantSection(bit=3, symmetric=True, granularity="per_group", group_size=32)
    assert cfg.quant.special["copy"]["group_size"] == 32
    assert (cfg.eval.seq_len, cfg.eval.bs, cfg.eval.max_windows) == (256, 2, 3)


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "~", "null"])
def test_empty_config(text):
    with pytest.raises(ConfigError, match="empty") as exc:
        load_config(text + "\n")
    one_line(exc)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_config_must_be_a_mapping(text):
    with pytest.raises(ConfigError, match="mapping") as exc:
        load_config(text)
    one_line(exc)


def test_missing_file(tmp_path):
    for source in (tmp_path / "nope.yml", str(tmp_path / "nope.yaml")):
        with pytest.raises(ConfigError, match="not found") as exc:
            load_config(source)
        assert "nope.y" in one_line(exc)


def test_unreadable_file(tmp_path):
    file = tmp_path / "latin1.yml"
    file.write_bytes("model: {path: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8") as exc:
        load_config(file)
    one_line(exc)


@pytest.mark.parametrize(
    "text,line",
    [
        ("model:\n  path: m\n bad: 1\n", 3),
        ("model: {path: m\n", 2),
        ("model:\n\tpath: m\n", 2),
        ("model: [path\n", 2),
        ("model: 'unterminated\n", 2),
    ],
)
def test_malformed_yaml(tmp_path, text, line):
    file = tmp_path / "bad.yml"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(file)
    msg = one_line(exc)
    assert msg.startswith(f"malformed YAML in {file}") and f"line {line}" in msg and "fix" in msg


def test_single_line_yaml_string_is_not_a_path():
    assert load_config("{model: {path: some/model}, base: {seed: 3}}").base.seed == 3


# ---------------------------------------------------------------- overrides


def test_overrides(tmp_path):
    file = tmp_path / "rtn.yml"
    file.write_text(LLMC_RTN, encoding="utf-8")
    cfg = load_config(str(file), ["quant.weight.bit=3", "eval.eval_pos=[pretrain]", "base.seed = 5",
                                  "save.save_path=/tmp/x=y", "quant.act="])
    assert cfg.quant.weight.bit == 3
    assert cfg.eval.eval_pos == ["pretrain"]
    assert cfg.base.seed == 5 and cfg.calib.seed == 42  # the alias was resolved before overriding
    assert cfg.save.save_path == "/tmp/x=y"  # only the first '=' splits
    assert cfg.quant.act is None
    # Later overrides win.
    assert load_config(file, ["quant.weight.bit=3", "quant.weight.bit=8"]).quant.weight.bit == 8


def test_override_creates_missing_sections():
    cfg = load_config(minimal(), ["quant.weight.bit=3", "quant.weight.granularity=per_channel", "calib.n_samples=16"])
    assert cfg.quant == QuantSection(weight=WeightQuantSection(bit=3, granularity="per_channel"))
    assert cfg.calib == CalibSection(n_samples=16)


def test_override_through_null_section():
    cfg = load_config("model: {path: m}\neval:\n", ["eval.seq_len=64"])
    assert cfg.eval == EvalSection(seq_len=64)


@pytest.mark.parametrize("item", ["quant.weight.bit", "=3", "  =3", ""])
def test_bad_override_syntax(item):
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(), [item])
    msg = one_line(exc)
    assert "--set" in msg and "key=value" in msg and "quant.weight.bit=3" in msg


def test_override_into_a_scalar():
    with pytest.raises(ConfigError, match="not a section") as exc:
        load_config(minimal(), ["model.path.sub=3"])
    assert "model.path.sub" in one_line(exc)


def test_override_values_are_validated():
    with pytest.raises(ConfigError, match=r"quant\.weight\.bit: bit=9 is outside 2\.\.8") as exc:
        load_config(minimal(), ["quant.weight.bit=9"])
    one_line(exc)
    with pytest.raises(ConfigError, match="unknown key 'quant.weight.bits'; did you mean 'bit'"):
        load_config(minimal(), ["quant.weight.bits=3"])


def test_overrides_do_not_mutate_the_callers_dict():
    raw = minimal(quant={"weight": {"bit": 4}})
    before = copy.deepcopy(raw)
    assert load_config(raw, ["quant.weight.bit=3", "eval.seq_len=64"]).quant.weight.bit == 3
    assert raw == before


# ---------------------------------------------------------------- validation messages


@pytest.mark.parametrize(
    "raw,key,suggestion",
    [
        ({"model": {"path": "m"}, "qaunt": {}}, "qaunt", "quant"),
        ({"model": {"path": "m", "pth": "x"}}, "model.pth", "path"),
        ({"model": {"path": "m"}, "calib": {"n_sample": 4}}, "calib.n_sample", "n_samples"),
        ({"model": {"path": "m"}, "eval": {"evalpos": []}}, "eval.evalpos", "eval_pos"),
        ({"model": {"path": "m"}, "quant": {"weight": {"granularty": "per_channel"}}},
         "quant.weight.granularty", "granularity"),
        ({"model": {"path": "m"}, "quant": {"act": {"symetric": True}}}, "quant.act.symetric", "symmetric"),
        ({"model": {"path": "m"}, "quant": {"ignored_layers": {"special_names": []}}},
         "quant.ignored_layers.special_names", "speical_names"),
        ({"model": {"path": "m"}, "save": {"savepath": "x"}}, "save.savepath", "save_path"),
    ],
)
def test_unknown_keys_suggest_the_closest(raw, key, suggestion):
    with pytest.raises(ConfigError) as exc:
        load_config(raw)
    msg = one_line(exc)
    assert f"unknown key {key!r}" in msg
    assert f"did you mean {suggestion!r}?" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(quant={"weight": {"zzzzzz": 1}}))
    msg = one_line(exc)
    assert "unknown key 'quant.weight.zzzzzz'" in msg
    assert "valid keys here:" in msg
    for key in WeightQuantSection.model_fields:
        assert key in msg


@pytest.mark.parametrize("bit", [0, 1, 9, 16, -4])
@pytest.mark.parametrize("section", ["weight", "act"])
def test_bit_out_of_range(bit, section):
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(quant={section: {"bit": bit}}))
    msg = one_line(exc)
    assert msg.startswith(f"quant.{section}.bit: bit={bit} is outside 2..8")
    assert "from 2 to 8" in msg


@pytest.mark.parametrize("bit", [2, 3, 8])
def test_bit_in_range(bit):
    assert load_config(minimal(quant={"weight": {"bit": bit}, "act": {"bit": bit}})).quant.act.bit == bit


@pytest.mark.parametrize(
    "raw,where,bad,allowed",
    [
        (minimal(quant={"weight": {"granularity": "per_block"}}), "quant.weight.granularity", "per_block",
         ["per_tensor", "per_channel", "per_group"]),
        (minimal(quant={"act": {"granularity": "per_channel"}}), "quant.act.granularity", "per_channel",
         ["per_tensor", "per_token"]),
        (minimal(quant={"weight": {"calib_algo": "kl"}}), "quant.weight.calib_algo", "kl", ["minmax", "mse"]),
        (minimal(eval={"eval_pos": ["pretrain", "after"]}), "eval.eval_pos.1", "after",
         ["pretrain", "transformed", "fake_quant"]),
        ({"model": {"path": "m", "torch_dtype": "fp16"}}, "model.torch_dtype", "fp16",
         ["auto", "float32", "float16", "bfloat16"]),
    ],
)
def test_literal_errors_list_allowed_values(raw, where, bad, allowed):
    with pytest.raises(ConfigError) as exc:
        load_config(raw)
    msg = one_line(exc)
    assert msg.startswith(f"{where}: {bad!r} is not allowed; use one of")
    for value in allowed:
        assert repr(value) in msg


@pytest.mark.parametrize("flag", ["save_fake", "save_trans"])
def test_save_without_path(flag):
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(save={flag: True}))
    msg = one_line(exc)
    assert "save.save_path" in msg and "set save.save_path" in msg
    assert load_config(minimal(save={flag: True, "save_path": "out"})).save.save_path == "out"


@pytest.mark.parametrize(
    "raw,words",
    [
        ({}, ["missing required key 'model'"]),
        ({"model": {}}, ["missing required key 'model.path'"]),
        (minimal(quant={"weight": {"granularity": "per_group", "group_size": -1}}),
         ["quant.weight", "group_size >= 1", "per_channel"]),
        (minimal(quant={"act": {"static": True}}), ["quant.act", "per_tensor"]),
        (minimal(quant={"act": {"static": True, "granularity": "per_tensor"}}), ["calib"]),
        (minimal(calib={"bs": 0}), ["calib.bs", "-1"]),
        (minimal(calib={"n_samples": 0}), ["calib.n_samples", "got 0"]),
        (minimal(quant={"weight": {"bit": "four"}}), ["quant.weight.bit", "'four'"]),
        (minimal(base={"seed": [1]}), ["base.seed"]),
        (minimal(quant=[1, 2]), ["quant"]),
    ],
)
def test_other_errors_are_one_line_and_name_the_key(raw, words):
    with pytest.raises(ConfigError) as exc:
        load_config(raw)
    msg = one_line(exc)
    for word in words:
        assert word in msg


def test_several_problems_are_counted():
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(quant={"weight": {"bit": 9, "granularity": "per_row"}}, eval={"bs": 0}))
    msg = one_line(exc)
    assert msg.startswith("eval.bs: ") and msg.endswith("(and 2 more problems)")  # the first, in field order
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(quant={"weight": {"bit": 9}}, eval={"bs": 0}))
    assert one_line(exc).endswith("(and 1 more problem)")


def test_static_per_tensor_with_calib_is_valid():
    cfg = load_config(minimal(quant={"act": {"static": True, "granularity": "per_tensor"}}, calib={}))
    assert cfg.quant.act == ActQuantSection(static=True, granularity="per_tensor")


def test_config_error_is_an_llmc_error():
    assert issubclass(ConfigError, LlmcError)


# ---------------------------------------------------------------- known loader crashes

CONSTRUCTOR_CRASHES = [
    "model: {path: m}\nbase: {seed: 2001-13-01}\n",  # implicit timestamp with month 13 -> ValueError
    "model: {path: !!int abc}\n",  # ValueError
    "model: {path: !!float abc}\n",  # ValueError
    "model: {path: !!timestamp abc}\n",  # AttributeError
]


@pytest.mark.parametrize("text", CONSTRUCTOR_CRASHES)
def test_yaml_constructor_errors_are_config_errors(text):
    with pytest.raises(ConfigError) as exc:
        load_config(text)
    one_line(exc)


@pytest.mark.parametrize("item", ["base.seed=2001-13-01", "base.seed=!!int x", "model.path=!!float x"])
def test_override_constructor_errors(item):
    try:
        load_config(minimal(), [item])
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_long_single_line_yaml_string():
    assert load_config("{model: {path: " + "x" * 300 + "}}").model.path == "x" * 300


def test_deeply_nested_yaml():
    with pytest.raises(ConfigError) as exc:
        load_config("model: " + "[" * 5000 + "\n")
    one_line(exc)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_methods(path):
    from llmc.schedule import build_methods

    cfg = load_config(path)
    assert build_methods(cfg)
