"""The calibration activation cache on disk (`base.act_cache: disk`), for runs whose activations
do not fit in host memory.

Each generation of hidden states (block 0's captured inputs, then every block's outputs) is a
`DiskHidden`: one raw file per batch, written when the batch is appended and memory-mapped
(copy-on-write, read lazily) when it is indexed, so host memory holds about the batch being run.
A block's inputs and its outputs coexist on disk; a generation's files are deleted as soon as
nothing refers to it any more, or when the pipeline releases block i's inputs at the end of block i.

The cache folder is a fresh temporary folder inside `base.act_cache_dir`, or beside
`save.save_path`, or in the system's temporary folder; `DiskCache` removes it when the run ends,
also when it fails.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

PREFIX = ".llmc-act-cache-"


def cache_parent(act_cache_dir: str | None, save_path: str | None) -> Path:
    """Where the run's cache folder is made: `act_cache_dir`, else beside save_path, else the temp dir."""
    if act_cache_dir:
        return Path(os.path.expandvars(act_cache_dir)).expanduser()
    if save_path:
        return Path(save_path).expanduser().absolute().parent
    return Path(tempfile.gettempdir())


class DiskCache:
    """The run's cache folder (made at the first write) and the generations of hidden states in it."""

    def __init__(self, parent: Path) -> None:
        self.parent = Path(parent)
        self.folder: Path | None = None
        self._generations = itertools.count()

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def generation(self) -> DiskHidden:
        """An empty generation of hidden states, filled with `append`."""
        return DiskHidden(self, next(self._generations))

    def path(self, generation: int, index: int) -> Path:
        if self.folder is None:
            self.parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.parent))
        return self.folder / f"g{generation}-b{index}.bin"

    def close(self) -> None:
        """Remove the folder (memory-mapped batches still in use stay readable until released)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _remove(paths: list[Path]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


class DiskHidden(Sequence[Tensor]):
    """One generation of hidden states, one file per batch; reads like a list of CPU tensors."""

    def __init__(self, cache: DiskCache, generation: int) -> None:
        self.cache = cache
        self.generation = generation
        self.paths: list[Path] = []
        self.meta: list[tuple[torch.Size, torch.dtype]] = []
        self.finite = True
        """Whether every appended tensor was finite (checked on its device before the write, so the
        pipeline's NaN/Inf check need not read the files back)."""
        self.release = weakref.finalize(self, _remove, self.paths)
        """Delete the files now (else when this generation is garbage); later reads fail."""

    def new_generation(self) -> DiskHidden:
        return self.cache.generation()

    def append(self, hidden: Tensor) -> None:
        hidden = hidden.detach()
        self.finite = self.finite and bool(torch.isfinite(hidden).all())
        host = hidden.to("cpu").contiguous()
        path = self.cache.path(self.generation, len(self.paths))
        with open(path, "wb") as f:
            if host.numel():
                f.write(host.view(-1).view(torch.uint8).numpy().data)
        self.paths.append(path)
        self.meta.append((host.shape, host.dtype))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        shape, dtype = self.meta[index]
        if not shape.numel():
            return torch.empty(shape, dtype=dtype)
        return torch.from_file(str(self.paths[index]), shared=False, size=shape.numel(), dtype=dtype).view(shape)

    def __iter__(self) -> Iterator[Tensor]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return f"DiskHidden(generation={self.generation}, batches={len(self)}, folder={self.cache.folder})"
