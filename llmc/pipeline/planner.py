"""Memory planner: estimate peak device and host memory before a run, place the activation
cache, and refuse a run that cannot fit with a message that says what to change.

The estimate follows the schedule: one block's weights on the device, the calibration
hidden states (a block's inputs and its outputs coexist), one batch's transient activations
inside the block, and what the methods keep (Hessians, recorded module calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmc.errors import LlmcError

GIB = 1024**3


@dataclass
class MemoryPlan:
    block_bytes: int
    cache_bytes: int
    transient_bytes: int
    method_bytes: int
    cache_on_device: bool
    device_total: int | None
    host_model_bytes: int
    batches: int = 1

    @property
    def peak_device(self) -> int:
        cache = self.cache_bytes if self.cache_on_device else 2 * self.cache_bytes // max(1, self.batches)
        return self.block_bytes + cache + self.transient_bytes + self.method_bytes

    @property
    def peak_host(self) -> int:
        return self.host_model_bytes + (0 if self.cache_on_device else self.cache_bytes)

    def describe(self) -> str:
        where = "device" if self.cache_on_device else "pinned host memory"
        return (
            f"memory plan: peak device {self.peak_device / GIB:.2f} GiB (block {self.block_bytes / GIB:.2f}, "
            f"activation cache {self.cache_bytes / GIB:.2f} on {where}, transient {self.transient_bytes / GIB:.2f}, "
            f"method {self.method_bytes / GIB:.2f}); peak host {self.peak_host / GIB:.2f} GiB"
        )


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def block_transient_bytes(block: nn.Module, tokens_per_batch: int, elem: int) -> int:
    """Activations alive inside one block for one batch (the widest linear outputs at once), the
    float32 copies a fake-quantized linear makes of its weight when it quantizes it (one when no
    data runs through the block), and, when data does, the quantized weights the block's
    linears keep for the batches of one forward (`fake_weights_reused`)."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    outs = sorted((m.out_features for m in linears), reverse=True)
    widest = sum(outs[:3]) if outs else 0
    largest = max((m.in_features * m.out_features for m in linears), default=0)
    if not tokens_per_batch:
        return 4 * largest
    reused = sum(m.in_features * m.out_features for m in linears) * elem
    return tokens_per_batch * widest * elem * 2 + 3 * 4 * largest + reused


def plan_memory(
    model: nn.Module,
    blocks: nn.ModuleList,
    n_samples: int,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    method_bytes: int = 0,
    cache_policy: str = "auto",
) -> MemoryPlan:
    param = next(model.parameters())
    elem = param.element_size()
    hidden = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim
    cache = 2 * n_samples * seq_len * hidden * elem
    block = max(_bytes(b) for b in blocks)
    transient = block_transient_bytes(blocks[0], batch_size * seq_len, elem)
    total = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        total = free + torch.cuda.memory_allocated(device)
    batches = max(1, -(-n_samples // max(1, batch_size)))
    on_device = cache_policy == "device" or (
        cache_policy == "auto" and (total is None or block + cache + transient + method_bytes < 0.85 * total)
    )
    return MemoryPlan(block, cache, transient, method_bytes, on_device, total, _bytes(model), batches)


def check_fits(plan: MemoryPlan, device: torch.device) -> None:
    if plan.device_total is None or plan.peak_device <= 0.95 * plan.device_total:
        return
    raise LlmcError(
        f"estimated peak memory {plan.peak_device / GIB:.1f} GiB does not fit the {plan.device_total / GIB:.1f} GiB of "
        f"{device}; lower calib.n_samples or calib.bs, or set base.act_cache: cpu (activations in host memory)"
    )
