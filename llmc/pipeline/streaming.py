"""Disk-streamed models (`model.stream: true`): host memory near one or two blocks plus the
activation cache, whatever the model size.

The model is built on the meta device; the modules outside the decoder blocks (embeddings, final
norm, LM head; rotary buffers are computed as usual) are read from the checkpoint's safetensors at
load. Each block's tensors are read lazily (memory-mapped `safe_open`, only that block's keys, in
the dtype of the model) when the pipeline takes the block to the device (`BlockStore.trip`), and
put back on the meta device when the block comes back. A finished block is written at once into
each output folder (llmc.pipeline.stream_output).

Checkpoint keys are the model's module names (transformers' own layout: Llama-style
`model.layers.N.`); a checkpoint whose names differ, or an adapter that rewrites modules on load
(`prepare`), is refused with one line.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from llmc.errors import ConfigError, ModelError

log = logging.getLogger("llmc")

STORE_ATTR = "_llmc_block_store"
PACKED_FIX = "drop it (save_fake, save_trans, save_vllm and save_sgl stream) or drop model.stream"


def block_store(model: nn.Module) -> BlockStore | None:
    """The store a streamed model reads its blocks from (None: the model is in memory)."""
    return getattr(model, STORE_ATTR, None)


def checkpoint_keys(folder: str) -> dict[str, str]:
    """{tensor name: safetensors file} over the checkpoint's shards (headers only)."""
    from safetensors import safe_open

    from llmc.models.loader import safetensors_files

    files = safetensors_files(folder)
    if not files:
        raise ConfigError(f"model.stream reads safetensors, and {folder} holds none; convert the checkpoint to "
                          f"safetensors or drop model.stream")
    keys = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    return keys


class BlockStore:
    """Where each decoder block's tensors come from: the safetensors files of `folder`."""

    def __init__(self, model: nn.Module, blocks_path: str, folder: str) -> None:
        large_tensors_off_heap()
        self.model = model
        self.blocks_path = blocks_path
        self.sink: Callable[[int, nn.Module], None] | None = None
        """Called with each block the compression loop finished (llmc.schedule), before it is released."""
        self.open(folder)

    def open(self, folder: str | Path) -> None:
        """Read the blocks from `folder` from now on (the checkpoint, or an output written by this run)."""
        self.folder = str(folder)
        self.keys = checkpoint_keys(self.folder)

    def check_names(self, wanted) -> None:
        missing = sorted(k for k in wanted if k not in self.keys)
        if missing:
            raise ModelError(f"model.stream: {missing[0]} is not in the safetensors of {self.folder} (the checkpoint "
                             f"names its tensors differently from the model's modules); drop model.stream")

    def prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}."

    def _blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    def load(self, index: int, device: torch.device) -> nn.Module:
        """Block `index` with its checkpoint tensors on `device` (tensors not in the checkpoint:
        non-persistent buffers, quantizer state a method made, move to `device` as they are)."""
        from safetensors import safe_open

        block = self._blocks()[index]
        prefix = self.prefix(index)
        wanted = {prefix + k for k in block.state_dict(keep_vars=True)}
        self.check_names(wanted)
        by_file: dict[str, list[str]] = {}
        for key in sorted(wanted):
            by_file.setdefault(self.keys[key], []).append(key)
        with torch.no_grad():
            for file, keys in by_file.items():
                with safe_open(file, framework="pt") as f:
                    for key in keys:
                        _assign(block, key[len(prefix):], f.get_tensor(key), device)
            for module in block.modules():
                for table in (module._parameters, module._buffers):
                    for name, t in table.items():
                        if t is not None and not t.is_meta and t.device != device:
                            table[name] = _like(t, t.detach().to(device))
        return block

    def release(self, index: int) -> None:
        """Back to the meta device: the block's checkpoint tensors and its fake-quant linears' quantizer
        state are freed (the block was written with them; evaluations read the written blocks with
        quantization off); what else a method attached (masks, online transforms; small) goes to host
        memory. Kept quantizer state grew host memory by 0.05 GiB per 70B-shaped block (W4 g128)."""
        from llmc.quant.fake_linear import FakeQuantLinear

        block = self._blocks()[index]
        saved = set(block.state_dict(keep_vars=True))
        for mod_name, module in block.named_modules():
            quantizer_state = set(module._buffers) if isinstance(module, FakeQuantLinear) else set()
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is None or t.is_meta:
                        continue
                    key = f"{mod_name}.{name}" if mod_name else name
                    target = "meta" if key in saved or name in quantizer_state else "cpu"
                    table[name] = _like(t, t.detach().to(target))
        trim_heap()

    def trip(self, index: int, block: nn.Module, device: torch.device) -> StreamedTrip:
        return StreamedTrip(self, index, device)


class StreamedTrip:
    """`ModuleHome`'s interface for a streamed block: `leave()` reads it onto the device,
    `come_back()` releases it."""

    def __init__(self, store: BlockStore, index: int, device: torch.device) -> None:
        self.store, self.index, self.device = store, index, device

    def leave(self) -> None:
        self.store.load(self.index, self.device)

    def come_back(self) -> None:
        self.store.release(self.index)


def _like(old: Tensor, new: Tensor) -> Tensor:
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


def _assign(block: nn.Module, name: str, value: Tensor, device: torch.device) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = block.get_submodule(owner_name) if owner_name else block
    table = owner._parameters if attr in owner._parameters else owner._buffers
    old = table[attr]
    table[attr] = _like(old, value.to(device=device, dtype=old.dtype))


# ---- loading ---------------------------------------------------------------------------------


def check_stream_config(cfg) -> None:
    """Refuse, before the model loads, what streaming cannot do (cfg: LlmcConfig)."""
    from llmc.config.schema import SAVE_FLAGS

    m = cfg.model
    if m.gguf_file:
        raise ConfigError("model.stream reads safetensors block by block, not GGUF (model.gguf_file); convert the "
                          "checkpoint to safetensors or drop model.stream")
    from llmc.pipeline.stream_output import STREAMED_EXPORTS

    flags = [f for f in SAVE_FLAGS if getattr(cfg.save, f) and f not in ("save_trans", "save_fake")]
    packed = [f for f in flags if f not in STREAMED_EXPORTS]
    if packed:
        raise ConfigError(f"save.{packed[0]} is not written from a streamed model yet; {PACKED_FIX}")
    if flags and (cfg.sparse is not None or cfg.quant is None or cfg.quant.kvcache is not None):
        raise ConfigError(f"save.{flags[0]} of a streamed model takes quantized weights only (no sparse section, no "
                          f"quant.kvcache); drop save.{flags[0]} or model.stream")
    if cfg.eval is not None and cfg.eval.tasks:
        raise ConfigError("eval.tasks runs lm-eval on a model in memory; with model.stream remove eval.tasks "
                          "(perplexity streams) or drop model.stream")
    if cfg.eval is not None:
        needs = {"transformed": "save_trans", "fake_quant": "save_fake"}
        for pos in cfg.eval.eval_pos:
            flag = needs.get(pos)
            if flag and not (cfg.save.save_path and getattr(cfg.save, flag)):
                raise ConfigError(f"with model.stream, eval at {pos} reads the blocks written by save.{flag}; set "
                                  f"save.save_path and save.{flag}: true, or remove {pos} from eval.eval_pos")
        if "fake_quant" in cfg.eval.eval_pos and cfg.quant is not None and (
                cfg.quant.act is not None or cfg.quant.kvcache is not None):
            raise ConfigError("with model.stream, eval at fake_quant runs the saved fake-quantized weights, without "
                              "activation or KV-cache quantization; remove fake_quant from eval.eval_pos or drop "
                              "model.stream")
    if cfg.save.save_path and (cfg.save.save_trans or cfg.save.save_fake) and cfg.quant is None and cfg.sparse is None:
        raise ConfigError("with model.stream, save_trans / save_fake write the blocks a method processed; add a "
                          "quant or sparse section, or drop model.stream")
    from llmc.models.loader import _looks_local, expand

    if not _looks_local(m.path):
        raise ConfigError(f"model.stream reads a local folder of safetensors, and model.path {m.path} is a hub id; "
                          f"download the checkpoint and point model.path at it, or drop model.stream")
    if os.path.isdir(expand(m.path)):  # (a missing folder is reported by check_model_paths)
        checkpoint_keys(expand(m.path))  # safetensors only (not .bin): refused here, before the model loads


def check_stream_methods(methods: list) -> None:
    """Methods that change the whole model outside the block loop cannot stream."""
    from llmc.methods.lifecycle import CompressionMethod
    from llmc.methods.sparse_base import SparseMethod

    for method in methods:
        removes_blocks = isinstance(method, SparseMethod) and not method.prunes_weights
        if type(method).prepare_model is not CompressionMethod.prepare_model or removes_blocks:
            raise ConfigError(f"{method.name} changes the whole model outside the block loop, which model.stream "
                              f"does not hold in memory; drop model.stream")


def empty_model(path: str, auto_class, dtype, adapter, **kwargs) -> nn.Module:
    """The model on the meta device with the non-block tensors read from the checkpoint."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig

    if adapter.prepare is not None:
        raise ConfigError(f"model.stream: the {adapter.name} adapter rewrites the model's modules on load, which "
                          f"streaming cannot; drop model.stream")
    config = AutoConfig.from_pretrained(path, **kwargs)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype, **kwargs)
    model.name_or_path = path
    model.config.name_or_path = path
    store = BlockStore(model, adapter.blocks, path)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    present = [k for k in model.state_dict(keep_vars=True) if not (k in tied and k not in store.keys)]
    store.check_names(present)  # every block's names too, before any work
    with torch.no_grad():
        for key in present:
            if not key.startswith(adapter.blocks + "."):
                with safe_open(store.keys[key], framework="pt") as f:
                    _assign(model, key, f.get_tensor(key), torch.device("cpu"))
        if len(present) < len(model.state_dict(keep_vars=True)):
            model.tie_weights()  # the LM head shares the embedding's tensor (tie_word_embeddings)
    setattr(model, STORE_ATTR, store)
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the tensors that are really in memory (not on the meta device)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


_LIBC = None
M_MMAP_THRESHOLD = -3


def large_tensors_off_heap() -> None:
    """Allocate every buffer of 1 MiB or more with mmap (glibc), so a released block's memory goes back
    to the system at once. By default glibc raises this threshold up to 32 MB as large buffers are
    freed; below it a block's freed working set stays on the heap, fragmented, and host memory grows
    block after block."""
    if _libc():
        _libc().mallopt(M_MMAP_THRESHOLD, 1 << 20)


def trim_heap() -> None:
    """Give the heap's freed memory back to the system (glibc)."""
    if _libc():
        _libc().malloc_trim(0)
