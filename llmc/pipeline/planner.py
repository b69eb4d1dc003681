"""Memory planner: estimate peak device and host memory before a run, place the activation
cache, and refuse a run that cannot fit with a message that says what to change.

The estimate follows the schedule: one block's weights on the device, the calibration
hidden states (a block's inputs and its outputs coexist), one batch's transient activations
inside the block, and what the methods keep (Hessians, recorded module calls).

Host memory: the process as it is when the plan is made (Python, torch, the tokenizer and data;
`host_runtime_bytes`), the model's tensors in memory (all of them, or for a disk-streamed model the
non-block ones plus two blocks: the one read and its copy in the model's dtype), and the activation
cache when it is neither on the device nor on disk (on disk: the two batches in flight); on a CPU
run the device is the host, so the block's transients, the methods' state and a perplexity batch's
logits are host memory too. Writing the outputs comes after the block loop: its copies count
against the loop's peak, not on top of it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from llmc.errors import LlmcError
from llmc.pipeline.streaming import block_store, resident_bytes

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
    host_runtime_bytes: int = 0
    """The process's resident memory beyond the model's tensors when the plan was made."""
    device_is_host: bool = False
    streamed: bool = False
    save_bytes: int = 0
    """Host memory the outputs take while written (after the block loop): save_fake's fake-quantized
    weights plus safetensors' serialized copy, of the whole model, or of one block when streamed."""
    eval_bytes: int = 0
    """Host memory one perplexity batch takes on a CPU run: its float32 logits and their log-softmax
    (a 2048-token window of a 49k vocabulary: 0.75 GiB, more than a small model itself)."""
    cache_dir: str | None = None
    """With `base.act_cache: disk`, the folder the activation cache is made in (None: not on disk)."""
    replay_bytes: int = 0
    """Device memory the methods take beyond `method_bytes` only with the activation cache on the device."""
    overlap: bool = False
    """Whether block transfers overlap the work (`BlockwisePipeline.overlap_transfers`): two more blocks
    on the device, the next one arriving and the last one leaving. Only with the activation cache on the
    device: a run that keeps it off the device is saving device memory."""

    @property
    def peak_device(self) -> int:
        cache = self.cache_bytes if self.cache_on_device else 2 * self.cache_bytes // max(1, self.batches)
        blocks = 3 if self.overlap else 1
        return blocks * self.block_bytes + cache + self.transient_bytes + self.method_bytes_used

    @property
    def method_bytes_used(self) -> int:
        return self.method_bytes + (self.replay_bytes if self.cache_on_device else 0)

    @property
    def peak_host(self) -> int:
        host = self.host_runtime_bytes + self.host_model_bytes
        if self.device_is_host:  # the "device" memory is host memory; the block is already in host_model_bytes
            loop = host + self.peak_device - self.block_bytes
        elif self.cache_dir is not None:  # on disk: the two batches in flight, read and written
            loop = host + 2 * self.cache_bytes // max(1, self.batches)
        else:  # overlapped trips stage the two blocks in flight through pinned host memory (offload.staged_to)
            loop = host + (0 if self.cache_on_device else self.cache_bytes) + (2 * self.block_bytes if self.overlap else 0)
        return max(loop, host + self.save_bytes, host + self.eval_bytes)

    def describe(self) -> str:
        where = "host memory" if self.device_is_host or not self.cache_on_device else "device"
        if self.cache_dir is not None:
            where = f"disk in {self.cache_dir}"
        model = "streamed: non-block tensors + 2 blocks" if self.streamed else "model"
        return (
            f"memory plan: peak device {self.peak_device / GIB:.2f} GiB (block {self.block_bytes / GIB:.2f}"
            f"{' x 3, transfers overlapped' if self.overlap else ''}, "
            f"activation cache {self.cache_bytes / GIB:.2f} on {where}, transient {self.transient_bytes / GIB:.2f}, "
            f"method {self.method_bytes_used / GIB:.2f}); peak host {self.peak_host / GIB:.2f} GiB ({model} "
            f"{self.host_model_bytes / GIB:.2f}, process {self.host_runtime_bytes / GIB:.2f}, saving "
            f"{self.save_bytes / GIB:.2f}, evaluating {self.eval_bytes / GIB:.2f})"
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
    replay_bytes: int = 0,
    cache_policy: str = "auto",
    measure_process: bool = False,
    save_fake: bool = False,
    save_trans: bool = False,
    eval_tokens: int = 0,
    cache_dir: str | None = None,
) -> MemoryPlan:
    """`cache_dir`: where the activation cache goes with `cache_policy="disk"`; `replay_bytes`: what the
    methods take beyond `method_bytes` with the activation cache on the device (`replay_device_bytes`)."""
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
    on_disk = cache_policy == "disk"

    def fits(blocks: int) -> bool:  # with the activation cache on the device
        return total is None or blocks * block + cache + transient + method_bytes + replay_bytes < 0.85 * total

    # on a CPU run host memory is the device's: the cache is there (auto, device, cpu) or on disk
    on_device = not on_disk and (cache_policy == "device" or device.type == "cpu" or (
        cache_policy == "auto" and fits(1)))
    resident = resident_bytes(model)
    streamed = block_store(model) is not None
    blocks_in_host = device.type == "cuda" and not streamed and next(blocks[0].parameters()).device.type == "cpu"
    overlap = blocks_in_host and on_device and fits(3)
    host_model = resident + 2 * block if streamed else _bytes(model)
    runtime = max(0, current_rss() - resident) if measure_process else 0
    unit = max(blocks, key=_bytes) if streamed else model
    written = _bytes(unit) if save_fake or save_trans else 0
    fake = sum(m.weight.numel() * m.weight.element_size() for m in unit.modules() if isinstance(m, nn.Linear))
    save = max(written + (fake if save_fake else 0), resident if streamed and written else 0)
    return MemoryPlan(block, cache, transient, method_bytes, on_device, total, host_model, batches,
                      host_runtime_bytes=runtime, device_is_host=device.type == "cpu", streamed=streamed,
                      save_bytes=save, eval_bytes=2 * eval_tokens * _vocab(model) * 4 if device.type == "cpu" else 0,
                      cache_dir=str(cache_dir or tempfile.gettempdir()) if on_disk else None, overlap=overlap,
                      replay_bytes=replay_bytes)


def _vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "out_features", None) or getattr(model.config, "vocab_size", 0)


def current_rss() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def check_fits(plan: MemoryPlan, device: torch.device) -> None:
    if plan.device_total is None or plan.peak_device <= 0.95 * plan.device_total:
        return
    raise LlmcError(
        f"estimated peak memory {plan.peak_device / GIB:.1f} GiB does not fit the {plan.device_total / GIB:.1f} GiB of "
        f"{device}; lower calib.n_samples or calib.bs, or set base.act_cache: cpu (activations in host memory)"
    )
