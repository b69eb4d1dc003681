"""Load a HF causal LM (folder, hub id or GGUF) with its tokenizer and adapter."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from llmc.config.schema import ModelSection
from llmc.errors import ModelError
from llmc.models.adapter import ModelAdapter
from llmc.models.convert import find_converter, load_tokenizer, remote_code_error
from llmc.models.registry import get_adapter

log = logging.getLogger("llmc")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter


def expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _looks_local(path: str) -> bool:
    """A path the user meant as a local folder (a hub id is `name` or `org/name`)."""
    return path.startswith(("/", ".", "~", "$")) or path.count("/") > 1 or os.path.exists(expand(path))


def check_model_paths(cfg: ModelSection) -> None:
    """Fail before any heavy work if a local model path or GGUF file is missing."""
    path = expand(cfg.path)
    local = _looks_local(cfg.path)
    if local and not os.path.isdir(path):
        raise ModelError(
            f"model path {cfg.path} not found; set model.path to a HF model folder"
            + (" (run `make setup` or `llmc fetch` to get the quickstart model)" if "llmc" in cfg.path else "")
        )
    if cfg.gguf_file and local and not os.path.isfile(os.path.join(path, cfg.gguf_file)):
        raise ModelError(
            f"GGUF file {cfg.gguf_file} not found in {cfg.path}; set model.gguf_file to a file in that folder"
            + (" (run `make setup` or `llmc fetch` to get the quickstart model)" if "llmc" in cfg.path else "")
        )
    if cfg.tokenizer_path and not os.path.exists(expand(cfg.tokenizer_path)) and local:
        raise ModelError(f"tokenizer path {cfg.tokenizer_path} not found; set model.tokenizer_path to a folder")


def resolve_adapter(cfg: ModelSection) -> ModelAdapter:
    """Read only the model's config to pick the adapter (fails fast on unsupported architectures)."""
    from transformers import AutoConfig

    if find_converter(cfg) is not None:  # remote-code layout converted to Llama on load (llmc/models/convert)
        return get_adapter(cfg.type, "llama")
    kwargs = _common_kwargs(cfg)
    try:
        hf_config = AutoConfig.from_pretrained(expand(cfg.path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if (remote := remote_code_error(cfg)) is not None:
            raise remote from None
        raise ModelError(
            f"cannot read the model config at {cfg.path} ({_first_line(exc)}); "
            f"point model.path at a HF model folder with config.json (or a GGUF via model.gguf_file)"
        ) from None
    return get_adapter(cfg.type, getattr(hf_config, "model_type", None))


def load_model(cfg: ModelSection) -> LoadedModel:
    import transformers
    from transformers import AutoTokenizer

    check_model_paths(cfg)
    adapter = resolve_adapter(cfg)
    converter = find_converter(cfg)
    kwargs = _common_kwargs(cfg)
    dtype = DTYPES.get(cfg.torch_dtype, "auto")
    if cfg.gguf_file and dtype == "auto":
        dtype = torch.float32
    try:
        auto = getattr(transformers, adapter.auto_class)  # AutoModelForCausalLM but for multi-modal families
        model = converter.load(cfg) if converter else auto.from_pretrained(expand(cfg.path), dtype=dtype, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the model at {cfg.path} ({_first_line(exc)}); check model.path") from None
    if cfg.gguf_file:
        forget_gguf_origin(model)
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if adapter.prepare is not None:
        adapter.prepare(model)
    adapter.check(model)
    tok_path = expand(cfg.tokenizer_path or cfg.path)
    tok_kwargs = dict(kwargs)
    if cfg.tokenizer_path and cfg.tokenizer_path != cfg.path:
        tok_kwargs.pop("gguf_file", None)
    try:
        tokenizer = load_tokenizer(cfg) if converter else AutoTokenizer.from_pretrained(  # converted: no remote code
            tok_path, use_fast=cfg.tokenizer_mode == "fast", **tok_kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the tokenizer at {tok_path} ({_first_line(exc)}); set model.tokenizer_path"
        ) from None
    log.info("loaded %s (%s, %s, %.1fM parameters)", cfg.path, adapter.name, next(model.parameters()).dtype,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter)


def forget_gguf_origin(model: nn.Module) -> None:
    """A GGUF checkpoint is dequantized to float on load, but transformers still marks the model
    as GGUF-quantized and refuses to save it; drop that mark so save_trans/save_fake work."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)


def _common_kwargs(cfg: ModelSection) -> dict:
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    return kwargs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
