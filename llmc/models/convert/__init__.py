"""Checkpoints published only as remote code, converted on load to a native transformers
architecture (Llama), so llmc never runs the checkpoint's own Python code.

A converter is keyed by the `model_type` in the checkpoint folder's config.json. It turns that
config into a `LlamaConfig` and the state dict (safetensors, else pytorch .bin; sharded or not)
into Llama's key names and math; llmc builds `LlamaForCausalLM.from_config` and loads the
converted state dict with `strict=True`. The loaded model is an ordinary Llama, served by the
Llama adapter (`model.type: auto`); the converter's name (`InternLM2`, `MiniCPM`) is also accepted
as `model.type` and names a Llama-layout adapter. Everything llmc writes from it (save_trans and
save_fake via `save_pretrained`, exports) is therefore an ordinary Llama checkpoint: config.json
says `llama`, and no remote code is needed to load it.

The tokenizer is loaded with `AutoTokenizer` without remote code; failing that, from the
folder's tokenizer.json, else from its sentencepiece tokenizer.model as a Llama tokenizer.

Only local folders are converted (a hub id is read by transformers as usual).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmc.config.schema import ModelSection
from llmc.errors import ModelError
from llmc.models.families.llama import LLAMA
from llmc.models.registry import get_adapter, register_adapter

log = logging.getLogger("llmc")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

LLAMA_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
    "attention_bias", "attention_dropout",
)
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class Converter:
    name: str
    """Accepted as `model.type` (a Llama-layout adapter of that name); used in messages."""
    model_types: tuple[str, ...]
    """config.json `model_type` values this converter reads."""
    llama_config: Callable[[dict], dict]
    """The checkpoint's config.json -> `LlamaConfig` keyword arguments."""
    state_dict: Callable[[dict, dict[str, Tensor]], dict[str, Tensor]]
    """(config.json, the checkpoint's tensors) -> Llama's state dict (consumes the input dict)."""
    aliases: tuple[str, ...] = ()
    auto_configs: tuple[str, ...] = ()
    """config.json `auto_map.AutoConfig` values that mark this layout (early checkpoints lack `model_type`)."""

    def load(self, cfg: ModelSection) -> nn.Module:
        """The checkpoint at `cfg.path` as a `LlamaForCausalLM` (dtype per `cfg.torch_dtype`)."""
        from transformers import AutoModelForCausalLM, LlamaConfig

        folder = _expand(cfg.path)
        source = read_config_json(folder) or {}
        missing = [k for k in REQUIRED_CONFIG_KEYS if k not in source]
        if missing:
            raise ModelError(
                f"config.json of the {self.name} checkpoint at {cfg.path} lacks {missing[0]!r}; "
                f"point model.path at the original {self.name} checkpoint folder"
            )
        try:
            config = LlamaConfig(**self.llama_config(source))
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelError(
                f"cannot convert the config of the {self.name} checkpoint at {cfg.path} to Llama "
                f"({_first_line(exc)}); check its config.json"
            ) from None
        state = read_state_dict(folder)
        dtype = _dtype(cfg.torch_dtype, source, state)
        converted = self.state_dict(source, state)
        with _no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _check_keys(self.name, cfg.path, model.state_dict(), converted)
        model.load_state_dict(converted, strict=True)
        del converted, state
        if config.tie_word_embeddings:
            model.tie_weights()
        log.info("converted %s (%s, published as remote code) to Llama on load; saved folders are Llama "
                 "checkpoints", cfg.path, self.name)
        return model


CONVERTERS: dict[str, Converter] = {}


def register_converter(converter: Converter) -> Converter:
    """Register `converter` for its model types, and its name and aliases as Llama-layout adapters."""
    for model_type in converter.model_types:
        CONVERTERS[model_type] = converter
    register_adapter(dataclasses.replace(LLAMA, name=converter.name, model_types=(), aliases=converter.aliases))
    return converter


def converted_model_types() -> list[str]:
    return sorted(CONVERTERS)


def read_config_json(path: str) -> dict | None:
    """A local folder's config.json as a dict (None for a hub id, a missing or unreadable file)."""
    file = os.path.join(_expand(path), "config.json")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_converter(cfg: ModelSection) -> Converter | None:
    """The converter for the checkpoint at `cfg.path`, by its config.json `model_type` (local folders)."""
    if cfg.gguf_file:
        return None
    config = read_config_json(cfg.path)
    if not config:
        return None
    if config.get("model_type") in CONVERTERS:
        return CONVERTERS[config["model_type"]]
    auto_map = config.get("auto_map")
    auto_config = auto_map.get("AutoConfig") if isinstance(auto_map, dict) and not config.get("model_type") else None
    return next((c for c in CONVERTERS.values() if auto_config and auto_config in c.auto_configs), None)


def remote_code_error(cfg: ModelSection) -> ModelError | None:
    """For a folder whose model_type exists only as remote code (config.json `auto_map`) that llmc
    neither runs (model.trust_remote_code is false) nor converts: the one-line error saying so."""
    config = read_config_json(cfg.path)
    if cfg.trust_remote_code or cfg.gguf_file or not config or not config.get("auto_map"):
        return None
    model_type = config.get("model_type")
    converted = ", ".join(converted_model_types())
    if cfg.type.lower() == "auto":
        try:
            get_adapter("auto", model_type)
        except ModelError as exc:
            return ModelError(f"{exc}; remote-code checkpoints converted to Llama on load: {converted}")
        return None
    return ModelError(
        f"the model at {cfg.path} (model_type {model_type!r}) exists only as remote code, which llmc runs only "
        f"with model.trust_remote_code: true; remote-code checkpoints converted to Llama on load: {converted}"
    )


# ---------------------------------------------------------------- config helpers


def llama_config_kwargs(source: dict, **overrides) -> dict:
    """The Llama-named keys of a Llama-like config.json (None values left out), plus `overrides`."""
    kwargs = {k: source[k] for k in LLAMA_CONFIG_KEYS if source.get(k) is not None}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def _dtype(name: str, source: dict, state: dict[str, Tensor]) -> torch.dtype:
    """`model.torch_dtype`, or for auto the checkpoint's (config.json, else its tensors; float32 if none)."""
    if name in DTYPES:
        return DTYPES[name]
    declared = source.get("torch_dtype") or source.get("dtype")
    if isinstance(declared, str) and declared.replace("torch.", "") in DTYPES:
        return DTYPES[declared.replace("torch.", "")]
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


# ---------------------------------------------------------------- weights


def read_state_dict(folder: str) -> dict[str, Tensor]:
    """Every tensor of the checkpoint: *.safetensors (per the shard index when there is one), else
    pytorch_model*.bin."""
    for index_name, pattern, reader in (
        ("model.safetensors.index.json", "*.safetensors", _read_safetensors),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin", _read_bin),
    ):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f).get("weight_map", {}).values()))
            files = [os.path.join(folder, name) for name in files]
        else:
            files = sorted(glob.glob(os.path.join(folder, pattern)))
        if files:
            state: dict[str, Tensor] = {}
            for file in files:
                try:
                    state.update(reader(file))
                except Exception as exc:  # noqa: BLE001  (any reader failure is a bad checkpoint file)
                    raise ModelError(
                        f"cannot read the weights file {file} ({_first_line(exc)}); check the checkpoint"
                    ) from None
            return state
    raise ModelError(
        f"no weights (*.safetensors or pytorch_model*.bin) in {folder}; point model.path at the checkpoint folder"
    )


def _read_safetensors(file: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(file)


def _read_bin(file: str) -> dict[str, Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # saved in the legacy (pre-zip) format, which cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def _check_keys(name: str, path: str, expected: dict[str, Tensor], got: dict[str, Tensor]) -> None:
    """One-line errors for tensors the converted state dict lacks, has in excess, or has in a wrong shape."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    problem = None
    if missing:
        problem = f"it lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    elif unexpected:
        problem = f"unexpected tensors {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
    else:
        for key, tensor in got.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                problem = f"{key} has shape {tuple(tensor.shape)}, its config says {tuple(expected[key].shape)}"
                break
    if problem:
        raise ModelError(
            f"cannot convert the {name} checkpoint at {path} to Llama ({problem}); "
            f"point model.path at an unmodified {name} checkpoint"
        )


def _no_init_weights():
    """transformers' context that skips random initialization (the weights are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(cfg: ModelSection) -> object:
    """The tokenizer without remote code: AutoTokenizer, else tokenizer.json, else tokenizer.model
    (sentencepiece) as a Llama tokenizer; a one-line ModelError if none loads."""
    from transformers import AutoTokenizer

    path = _expand(cfg.tokenizer_path or cfg.path)
    try:
        with _quiet_transformers():  # it reads config.json, whose model_type transformers does not know
            return AutoTokenizer.from_pretrained(path, use_fast=cfg.tokenizer_mode == "fast", trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = _first_line(exc)
    special = _special_tokens(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    sp_model = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(tokenizer_json):
        from transformers import PreTrainedTokenizerFast

        try:
            return _finish(PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, **special), path)
        except Exception as exc:  # noqa: BLE001
            reason = f"tokenizer.json: {_first_line(exc)}"
    if os.path.isfile(sp_model):
        if not (_installed("sentencepiece") and _installed("google.protobuf")):
            reason = "reading its tokenizer.model needs sentencepiece and protobuf (pip install sentencepiece protobuf)"
        else:
            try:
                return _finish(_llama_tokenizer_from_sp(sp_model, special), path)
            except Exception as exc:  # noqa: BLE001
                reason = f"tokenizer.model: {_first_line(exc)}"
    raise ModelError(
        f"cannot load the tokenizer at {path} without remote code ({reason}); set model.tokenizer_path "
        f"to a tokenizer folder transformers loads natively (e.g. with a tokenizer.json)"
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings about a config.json of a model_type it lacks, silenced (it is expected here)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def _llama_tokenizer_from_sp(sp_model: str, special: dict) -> object:
    """A Llama tokenizer read from a sentencepiece model alone (a folder holding just that file, so
    none of the checkpoint's remote-code tokenizer settings come along)."""
    from transformers import LlamaTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sp_model, os.path.join(tmp, "tokenizer.model"))
        return LlamaTokenizerFast.from_pretrained(tmp, **special)


def _special_tokens(path: str) -> dict:
    """bos/eos/unk/pad tokens (and a chat template) from tokenizer_config.json / special_tokens_map.json."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    out: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
        if isinstance(data.get("chat_template"), str):
            out["chat_template"] = data["chat_template"]
    return out


def _finish(tokenizer: object, path: str) -> object:
    log.info("loaded the tokenizer at %s without its remote code", path)
    return tokenizer


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


from llmc.models.convert import internlm2, minicpm  # noqa: E402, F401  (registers the converters)
