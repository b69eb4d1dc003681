"""Resume an interrupted run from its last finished block.

After every block the schedule writes into `<parent>/.<name>.llmc-resume/`, beside save_path:

- `block-NNNNN.safetensors`: the block's tensors as processed (its state dict and the
  non-persistent buffers such as fake-quant scales), the wrapped linears and the modules'
  `llmc_*` marks (pruned, ...) in the file's metadata;
- `rng.safetensors`: the torch RNG states;
- `state.json`, written last and atomically: the config fingerprint, the last finished block,
  every method's state, the Python and NumPy RNG states, the pretrain perplexities.

The next block's input hidden states are not written (2 GiB per block for a 7B model at 128 x
2048 tokens, more than the block itself): a resumed run loads the model and captures the block
inputs as before, then replays the finished blocks (`BlockwisePipeline.replay`: one forward
each, with the block as it was when its outputs were taken) while restoring them, restores
the methods' state and goes on from the next block. On the same machine its saved models are
byte-identical to an uninterrupted run's. Only safetensors and JSON are written, never pickle.
A block's file is written by a thread while the next block computes. The folder is removed
once the outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llmc.errors import ConfigError, OutputError
from llmc.quant.fake_linear import FakeQuantLinear

log = logging.getLogger("llmc")

FORMAT = 1
STATE = "state.json"
BUFFER = "buffer:"
"""Key prefix of a non-persistent buffer: `buffer:<module>:<name>`."""
MARK = "llmc_"
RNG = "rng.safetensors"

Wrap = Callable[[nn.Module, str, type[FakeQuantLinear]], FakeQuantLinear]
"""Re-creates fake-quant linear `name` of a block as the given class (the quantization method's)."""


def checkpoint_folder(out_path: Path) -> Path:
    return out_path.parent / f".{out_path.name}.llmc-resume"


def config_fingerprint(config: dict) -> str:
    """What must match for a checkpoint to be resumed: the config (outputs aside) and the versions."""
    import transformers

    from llmc import __version__

    data = {k: v for k, v in config.items() if k != "save"}
    data["versions"] = [__version__, torch.__version__, transformers.__version__]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def encode_state(value: Any) -> Any:
    """JSON for a method's state: dicts with int keys and tuples survive the round trip (as lists)."""
    if isinstance(value, dict):
        if any(not isinstance(k, str) for k in value):
            return {"__int_keys__": [[int(k), encode_state(v)] for k, v in value.items()]}
        return {k: encode_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_state(v) for v in value]
    return value


def decode_state(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__int_keys__"}:
            return {int(k): decode_state(v) for k, v in value["__int_keys__"]}
        return {k: decode_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    return value


def fake_quant_class(name: str) -> type[FakeQuantLinear]:
    """FakeQuantLinear or the subclass of that name (never an arbitrary import)."""
    pending = [FakeQuantLinear]
    while pending:
        cls = pending.pop()
        if cls.__qualname__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    raise ConfigError(f"the resume checkpoint names an unknown layer class {name!r}; delete the checkpoint folder")


def block_tensors(block: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The block's state dict and non-persistent buffers as CPU tensors, with what the metadata needs."""
    tensors: dict[str, Tensor] = dict(block.state_dict())
    for mname, module in block.named_modules():
        for bname, buf in module._buffers.items():
            if buf is not None and bname in module._non_persistent_buffers_set:
                tensors[f"{BUFFER}{mname}:{bname}"] = buf
    meta = {
        "wrapped": json.dumps({n: type(m).__qualname__ for n, m in block.named_modules()
                               if isinstance(m, FakeQuantLinear)}),
        "marks": json.dumps({n: marks for n, m in block.named_modules() if (marks := module_marks(m))}),
    }
    return cpu_copies(tensors), meta


def module_marks(module: nn.Module) -> list[str]:
    """The `llmc_*` flags a method set on a module (e.g. `llmc_pruned`), which later steps read."""
    return sorted(k for k, v in vars(module).items() if k.startswith(MARK) and v is True)


def cpu_copies(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU tensors safe to write from another thread: copies of device tensors and of tensors that
    share memory (safetensors refuses shared storage); CPU tensors that own their memory as they are."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        shared = ptr is not None and (ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size())
        if t.device.type != "cpu" or shared or not t.is_contiguous():
            t = t.to("cpu", copy=True).contiguous()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def restore_block(path: Path, block: nn.Module, wrap: Wrap | None) -> None:
    """Put a checkpointed block back: wrap its fake-quant linears, load its tensors, mark its pruned linears."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    wrapped = json.loads(meta.get("wrapped", "{}"))
    if wrapped and wrap is None:
        raise ConfigError(f"{path} holds quantized layers but the config quantizes nothing; delete the checkpoint")
    for name, cls_name in wrapped.items():
        wrap(block, name, fake_quant_class(cls_name))
    block.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(BUFFER)}, strict=True)
    for key, value in tensors.items():
        if key.startswith(BUFFER):
            mname, bname = key[len(BUFFER):].rsplit(":", 1)
            module = block.get_submodule(mname)
            old = module._buffers.get(bname)
            device = old.device if old is not None else next(module.parameters(), value).device
            module.register_buffer(bname, value.to(device), persistent=False)
    for name, marks in json.loads(meta.get("marks", "{}")).items():
        for mark in marks:
            if mark.startswith(MARK):
                setattr(block.get_submodule(name), mark, True)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"python": [version, list(internal), py_gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}


def set_rng_state(state: dict, tensors: dict[str, Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng:torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng:cuda:"))
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


class RunCheckpoint:
    """The resume folder of one run (see the module docstring)."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.perplexity: list[dict] = []
        """Pretrain perplexities, kept so a resumed run does not measure them again."""
        self.write_seconds = 0.0
        """Time the block loop spent on checkpoints (copies and waiting for the writer)."""
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def open(self, mode: str) -> dict | None:
        """The state to resume from, or None to start over. `mode`: auto (resume a matching checkpoint,
        drop another one), require (`--resume`: a matching checkpoint must exist), never."""
        if not self.folder.exists():
            if mode == "require":
                raise ConfigError(f"--resume: there is no checkpoint at {self.folder}; run without --resume")
            return None
        state = self._read_state()
        if state is not None and mode != "never":
            log.info("resuming after block %d from the checkpoint %s", state["done"], self.folder)
            self.perplexity = state.get("perplexity", [])
            return state
        if mode == "require":
            raise ConfigError(
                f"--resume: the checkpoint at {self.folder} was written by another config or llmc version; "
                f"rerun with that config, or without --resume to start over"
            )
        log.warning("removing the checkpoint %s (%s); starting over", self.folder,
                    "--no-resume" if mode == "never" else "another config or llmc version, or incomplete")
        self.remove()
        return None

    def _read_state(self) -> dict | None:
        try:
            state = json.loads((self.folder / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("fingerprint") != self.fingerprint:
            return None
        return state

    def save_block(self, index: int, block: nn.Module | None, methods: Sequence[Any]) -> None:
        """Checkpoint the run after block `index` (-1: after the statistics pass, no block yet)."""
        start = time.perf_counter()
        self.wait()
        tensors, meta = block_tensors(block) if block is not None else ({}, {})
        extra = {"rng:torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                extra[f"rng:cuda:{i}"] = s
        state = {"format": FORMAT, "fingerprint": self.fingerprint, "done": index,
                 "methods": [m.checkpoint_state() for m in methods], "rng": rng_state(),
                 "perplexity": self.perplexity}
        self._writer = threading.Thread(target=self._write, args=(index, tensors, meta, extra, state), daemon=True)
        self._writer.start()
        self.write_seconds += time.perf_counter() - start

    def _write(self, index: int, tensors: dict, meta: dict, extra: dict, state: dict) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if index >= 0:
                write_atomic(self.folder / f"block-{index:05d}.safetensors", lambda p: save_file(tensors, p, meta))
            write_atomic(self.folder / RNG, lambda p: save_file(extra, p))
            write_atomic(self.folder / STATE, lambda p: p.write_text(json.dumps(state), encoding="utf-8"))
        except BaseException as exc:  # re-raised in the main thread by wait()
            self._error = exc

    def wait(self, quiet: bool = False) -> None:
        """Block until the last checkpoint is on disk (re-raising a write failure unless `quiet`)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            if quiet:
                return
            raise OutputError(
                f"could not write the resume checkpoint in {self.folder} ({error}); free disk space there, "
                f"or set save.checkpoint: false"
            ) from None

    def restore_methods(self, state: dict, methods: Sequence[Any]) -> None:
        """Give the methods their state and the process its RNG state as they were after the last
        finished block (the blocks themselves come back through `restore_block`)."""
        if len(state["methods"]) != len(methods):
            raise ConfigError(f"the checkpoint at {self.folder} is for other methods; delete it")
        for method, method_state in zip(methods, state["methods"]):
            method.load_checkpoint_state(method_state)
        with safe_open(str(self.folder / RNG), framework="pt") as f:
            set_rng_state(state["rng"], {k: f.get_tensor(k) for k in f.keys()})

    def restore_block(self, index: int, block: nn.Module, wrap: Wrap | None) -> None:
        restore_block(self.folder / f"block-{index:05d}.safetensors", block, wrap)

    def remove(self) -> None:
        self.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
