"""Capture what each decoder block receives, for every batch of input ids.

The model's own forward runs with every block replaced by a catcher (embeddings, position
ids, causal masks and rotary embeddings are built by the model, so every family is
covered). The first catcher stores the hidden states; every catcher stores the other
arguments its block gets, since they may differ per layer (Gemma2/3 give sliding-window
layers their own mask and rotary embeddings); the last one stops the forward. Arguments
shared by several blocks are stored once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmc.models.adapter import ModelAdapter
from llmc.pipeline.disk_cache import DiskHidden
from llmc.pipeline.offload import on_device


def to_store(t: Tensor, device: torch.device) -> Tensor:
    """`t` moved to `device`, where the activation cache keeps it. From a CUDA device to the host it
    goes into pinned (page-locked) memory, which every later pass copies back to the device several
    times faster than pageable memory (`base.act_cache: cpu` copies the whole cache once per pass)."""
    if device.type == "cpu" and t.is_cuda:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return t.to(device)


def tree_to(obj: Any, device: torch.device | str, moved: dict[int, Any] | None = None) -> Any:
    """Move every tensor in nested tuples/lists/dicts to `device` (other objects unchanged). With
    `moved`, a tensor met again (by identity, e.g. a mask several blocks share) is moved only once."""
    if isinstance(obj, Tensor):
        if moved is None:
            return obj.to(device, non_blocking=True)
        if id(obj) not in moved:
            moved[id(obj)] = (obj, obj.to(device, non_blocking=True))  # keep obj alive: ids stay unique
        return moved[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(tree_to(o, device, moved) for o in obj)
    if isinstance(obj, list):
        return [tree_to(o, device, moved) for o in obj]
    if isinstance(obj, dict):
        return {k: tree_to(v, device, moved) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """Inputs of one decoder block for all batches: hidden states plus the other arguments."""

    hidden: list[Tensor]
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    token_masks: list[Tensor | None] = field(default_factory=list)
    """Per batch, `[b, seq]` bool of real (non-padding) tokens; None when all are real."""
    block_args: list[list[tuple]] | None = None
    block_kwargs: list[list[dict]] | None = None
    """Per block, then per batch, what that block receives beside the hidden states (None:
    every block gets `args` / `kwargs`)."""

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def on_disk(self) -> bool:
        """Whether the hidden states are files of the disk cache (`base.act_cache: disk`)."""
        return isinstance(self.hidden, DiskHidden)

    def new_hidden(self) -> list[Tensor]:
        """An empty list for outputs kept where these hidden states are (on disk: a new generation)."""
        return self.hidden.new_generation() if self.on_disk else []

    def store(self, index: int, hidden: Tensor) -> Tensor:
        """`hidden` moved to where batch `index`'s hidden states are kept (a disk generation writes
        it when appended)."""
        return hidden if self.on_disk else to_store(hidden, self.hidden[index].device)

    def release(self) -> None:
        """Free these hidden states now, they are not read again: delete their files on disk; in memory,
        empty their list (the caller that captured them would otherwise keep them alive to the end)."""
        if self.on_disk:
            self.hidden.release()
        else:
            self.hidden.clear()

    def with_hidden(self, hidden: list[Tensor]) -> BlockInputs:
        return BlockInputs(hidden, self.args, self.kwargs, self.token_masks, self.block_args, self.block_kwargs)

    def for_block(self, index: int) -> BlockInputs:
        """These hidden states with the other arguments block `index` receives."""
        if self.block_args is None or self.block_kwargs is None:
            return self
        return BlockInputs(self.hidden, self.block_args[index], self.block_kwargs[index], self.token_masks,
                           self.block_args, self.block_kwargs)

    def batch(self, index: int, device: torch.device) -> tuple[Tensor, tuple, dict]:
        """Batch `index`'s hidden states, args and kwargs, moved to `device` when stored elsewhere."""
        hidden, args, kwargs = self.hidden[index], self.args[index], self.kwargs[index]
        if hidden.device != device:
            # non-blocking from pinned memory: the copy is ordered before the block's work on the stream
            hidden = hidden.to(device, non_blocking=device.type == "cuda")
            args, kwargs = tree_to(args, device), tree_to(kwargs, device)
        return hidden, args, kwargs

    def batch_tokens(self, index: int) -> int:
        """Real (non-padding) tokens of batch `index`."""
        mask = self.token_masks[index] if index < len(self.token_masks) else None
        return int(mask.sum()) if mask is not None else self.hidden[index].shape[:-1].numel()

    def num_tokens(self) -> int:
        return sum(self.batch_tokens(i) for i in range(len(self)))


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a block: records its arguments, passes the hidden states on (or stops)."""

    def __init__(self, block: nn.Module, last: bool, returns_tuple: bool,
                 keep: Callable[[Tensor], None] | None = None) -> None:
        super().__init__()
        self.block = block
        self.last = last
        self.returns_tuple = returns_tuple
        self.keep = keep
        """Stores the hidden states as they arrive (the first block's catcher only)."""
        self.seen: list[tuple[tuple, dict]] = []

    def __getattr__(self, name: str) -> Any:
        # Models read attributes of their layers (e.g. `attention_type`) before calling them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.keep is not None:
            self.keep(hidden_states)
        self.seen.append((args, kwargs))
        if self.last:
            raise _StopForward
        return (hidden_states,) if self.returns_tuple else hidden_states


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[dict[str, Tensor | None]],
    device: torch.device,
    store_device: torch.device | None = None,
    hidden_store: list[Tensor] | None = None,
) -> BlockInputs:
    """Run `batches` (dicts of input_ids and attention_mask) through the model with every block
    replaced by a catcher: block 0's hidden states, and every block's other arguments.

    Block 0's hidden states go to `store_device` as each batch is caught, or into `hidden_store`
    (a disk cache's generation) when given."""
    store_device = store_device or device
    blocks = adapter.get_blocks(model)
    pre = adapter.pre_block_modules(model)
    hidden = hidden_store if hidden_store is not None else []

    def keep(h: Tensor) -> None:
        hidden.append(h if hidden_store is not None else to_store(h, store_device))

    catchers = [_Catcher(b, i == len(blocks) - 1, adapter.block_returns_tuple, keep if i == 0 else None)
                for i, b in enumerate(blocks)]
    for i, catcher in enumerate(catchers):
        blocks[i] = catcher
    try:
        with contextlib.ExitStack() as stack:
            for module in pre:
                stack.enter_context(on_device(module, device))
            for batch in batches:
                mask = batch.get("attention_mask")
                try:
                    model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=None if mask is None else mask.to(device),
                        use_cache=False,
                    )
                except _StopForward:
                    pass
    finally:
        for i, catcher in enumerate(catchers):
            blocks[i] = catcher.block
    moved: dict[int, Any] = {}
    inputs = BlockInputs(hidden=hidden, block_args=[], block_kwargs=[])
    for catcher in catchers:
        inputs.block_args.append([tree_to(args, store_device, moved) for args, _ in catcher.seen])
        inputs.block_kwargs.append([tree_to(kwargs, store_device, moved) for _, kwargs in catcher.seen])
    for batch in batches:
        mask = batch.get("attention_mask")
        inputs.token_masks.append(None if mask is None else mask.bool().to(store_device))
    inputs.args, inputs.kwargs = inputs.block_args[0], inputs.block_kwargs[0]
    return inputs

