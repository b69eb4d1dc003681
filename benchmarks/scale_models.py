"""Random-weight Llama-shaped checkpoints written one decoder layer at a time (benchmarks/scale.py).

`speed.build_model` builds the whole model in memory; a 70B shape with tens of layers does not fit
in host memory there, so here every layer is its own safetensors shard, generated (on the GPU when
there is one), written through a temporary name and renamed, so host memory holds one layer and a
killed build continues where it stopped. Layers live once in a shard store per shape; a checkpoint
of N layers is a folder of symlinks to the first N shards with its own config.json and index, so
the 2-, 4- and 24-layer checkpoints share their files on disk.

Values: normal(0, 0.02) for matrices and ones for norms, as speed.build_model (different draws).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def shape_config(dims: dict, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(**{**dims, "num_hidden_layers": layers}, max_position_embeddings=4096,
                       tie_word_embeddings=False, torch_dtype="bfloat16")


def tensor_shapes(dims: dict) -> tuple[dict[str, torch.Size], dict[str, torch.Size]]:
    """(names and shapes outside the layers, names and shapes of layer 0 without its prefix)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(dims, 1), dtype=torch.bfloat16)
    rest, layer = {}, {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers.0."):
            layer[name[len("model.layers.0."):]] = t.shape
        else:
            rest[name] = t.shape
    return rest, layer


def _random(shapes: dict[str, torch.Size], prefix: str, seed: int) -> dict[str, torch.Tensor]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=gen)
        else:
            t = torch.ones(shape, dtype=torch.bfloat16, device=device)
        out[prefix + name] = t.cpu()
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def shard_name(index: int | None) -> str:
    return "rest.safetensors" if index is None else f"layer-{index:05d}.safetensors"


class OutOfTime(Exception):
    """The build stopped at its deadline; the shards written so far stay (the next build goes on)."""


def build_store(shape: str, dims: dict, layers: int, root: Path, deadline: float | None = None
                ) -> tuple[Path, float, int]:
    """The shard store of `shape` holding at least `layers` layers; (folder, seconds spent writing
    now, bytes written now). Past `deadline` (time.monotonic()) it raises OutOfTime between shards."""
    store = root / f"{shape}-shards"
    store.mkdir(parents=True, exist_ok=True)
    rest, layer = tensor_shapes(dims)
    start, written = time.perf_counter(), 0
    todo = [None, *range(layers)]
    for index in todo:
        path = store / shard_name(index)
        if path.exists():
            continue
        if deadline is not None and time.monotonic() > deadline:
            raise OutOfTime(f"{shape}: {index} of {layers} layers written")
        shapes, prefix = (rest, "") if index is None else (layer, f"model.layers.{index}.")
        tensors = _random(shapes, prefix, seed=0 if index is None else 1 + index)
        _write(path, tensors)
        written += path.stat().st_size
        del tensors
    return store, time.perf_counter() - start, written


def checkpoint(shape: str, dims: dict, layers: int, root: Path, deadline: float | None = None
               ) -> tuple[Path, dict]:
    """A loadable folder of `layers` layers (symlinks into the store); (folder, build facts)."""
    store, seconds, written = build_store(shape, dims, layers, root, deadline)
    folder = root / f"{shape}-{layers}l-sharded"
    build = {"build_s": seconds, "build_gib": written / 2**30}
    if (folder / "config.json").exists():
        return folder, build
    folder.mkdir(parents=True, exist_ok=True)
    rest, layer = tensor_shapes(dims)
    weight_map = dict.fromkeys(rest, shard_name(None))
    for index in range(layers):
        weight_map.update(dict.fromkeys((f"model.layers.{index}.{k}" for k in layer), shard_name(index)))
    for name in set(weight_map.values()):
        link = folder / name
        if not link.exists():
            link.symlink_to(store / name)
    total = sum((store / n).stat().st_size for n in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    shape_config(dims, layers).save_pretrained(folder)  # last: its presence marks a complete folder
    return folder, build


def drop_page_cache(folder: Path) -> bool:
    """Ask the kernel to forget the cached pages of the folder's safetensors (POSIX_FADV_DONTNEED), so
    that a streamed run reads from disk rather than from the page cache of the build that wrote them."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.glob("*.safetensors"):
        fd = os.open(path.resolve(), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True
