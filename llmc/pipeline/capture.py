"""Capture what the first decoder block receives, for every batch of input ids.

The model's own forward runs up to its first block (embeddings, position ids, causal
mask, rotary embeddings are built by the model, so every family is covered), where a
catcher stores the block's positional and keyword arguments and stops the forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmc.models.adapter import ModelAdapter
from llmc.pipeline.offload import on_device


def tree_to(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor in nested tuples/lists/dicts to `device` (other objects unchanged)."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(tree_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [tree_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: tree_to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """Inputs of one decoder block for all batches: hidden states plus the other arguments."""

    hidden: list[Tensor]
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    token_masks: list[Tensor | None] = field(default_factory=list)
    """Per batch, `[b, seq]` bool of real (non-padding) tokens; None when all are real."""

    def __len__(self) -> int:
        return len(self.hidden)

    def with_hidden(self, hidden: list[Tensor]) -> BlockInputs:
        return BlockInputs(hidden, self.args, self.kwargs, self.token_masks)

    def batch(self, index: int, device: torch.device) -> tuple[Tensor, tuple, dict]:
        """Batch `index`'s hidden states, args and kwargs, moved to `device` when stored elsewhere."""
        hidden, args, kwargs = self.hidden[index], self.args[index], self.kwargs[index]
        if hidden.device != device:
            hidden, args, kwargs = hidden.to(device), tree_to(args, device), tree_to(kwargs, device)
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
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.seen: list[tuple[Tensor, tuple, dict]] = []

    def __getattr__(self, name: str) -> Any:
        # Models read attributes of their layers (e.g. `attention_type`) before calling them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.seen.append((hidden_states, args, kwargs))
        raise _StopForward


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[dict[str, Tensor | None]],
    device: torch.device,
    store_device: torch.device | None = None,
) -> BlockInputs:
    """Run `batches` (dicts of input_ids and attention_mask) up to the first block."""
    store_device = store_device or device
    blocks = adapter.get_blocks(model)
    pre = adapter.pre_block_modules(model)
    catcher = _Catcher(blocks[0])
    blocks[0] = catcher
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
        blocks[0] = catcher.block
    inputs = BlockInputs(hidden=[])
    for (hidden, args, kwargs), batch in zip(catcher.seen, batches):
        inputs.hidden.append(hidden.to(store_device))
        inputs.args.append(tree_to(args, store_device))
        inputs.kwargs.append(tree_to(kwargs, store_device))
        mask = batch.get("attention_mask")
        inputs.token_masks.append(None if mask is None else mask.bool().to(store_device))
    return inputs

