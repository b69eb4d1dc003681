"""Data-parallel calibration over several processes (`torchrun --nproc-per-node N llmc run CFG`).

Every rank loads the model and builds the same calibration batches (same seed), then captures and
forwards only its contiguous shard of them (`shard`: as even as possible, the first ranks get one
batch more). What methods accumulate over batches is summed over ranks before use (the Hessian in
`llmc.methods.hessian`, static activation ranges in `llmc.pipeline.blockwise`, AWQ's channel means,
search errors and clip samples, SmoothQuant's channel maxima); every rank then
solves the block from identical statistics, and rank 0's processed block (weights, scales, zero
points, every buffer) is broadcast so all ranks feed the next block from bit-identical weights.
Perplexity windows are split across ranks too (NLL sums reduced); rank 0 alone runs lm-eval tasks,
prints and writes outputs. Without WORLD_SIZE > 1 in the environment nothing here does anything.

Backend: NCCL with device cuda:LOCAL_RANK when base.device is CUDA, else gloo. Collectives time out
after $LLMC_DIST_TIMEOUT_MIN minutes (default 120: rank 0 may run lm-eval tasks meanwhile).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llmc.errors import ConfigError

log = logging.getLogger("llmc")
T = TypeVar("T")


def env_world_size() -> int:
    """The process count torchrun announces (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Whether this process prints and writes outputs (rank 0, or the only process)."""
    return rank() == 0


def env_rank() -> int:
    """This process's rank as torchrun announces it (0 when not launched by it); still known after the
    process group is gone, when the command line reports an error."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def rank_tag() -> str:
    """` (rank R)` in a multi-process run (torchrun), for error lines; empty otherwise."""
    return f" (rank {env_rank()})" if env_world_size() > 1 else ""


def check_methods(methods: Sequence, world: int) -> None:
    """One ConfigError line, before the model loads, for a method that cannot calibrate data-parallel."""
    for method in methods:
        if not getattr(method, "data_parallel", False):
            raise ConfigError(
                f"method {method.name} does not support data-parallel calibration yet; run it on one process "
                f"(without torchrun)"
            )
        if method.wants_statistics_pass:
            raise ConfigError(
                f"method {method.name}'s statistics pass (quant.auto_scheme, OWL layer sparsity) does not support "
                f"data-parallel calibration yet; run it on one process (without torchrun)"
            )


def check_batches(n_samples: int, bs: int, world: int) -> None:
    """Every rank needs at least one calibration batch."""
    batches = 1 if bs == -1 else math.ceil(n_samples / bs)
    if batches < world:
        raise ConfigError(
            f"calib gives {batches} batch(es) (n_samples {n_samples}, bs {bs}) for {world} processes and each "
            f"process needs at least one; set calib.bs to at most {max(1, n_samples // world)} or raise calib.n_samples"
        )


def shard_range(n: int, parts: int | None = None, index: int | None = None) -> range:
    """This rank's contiguous share of `n` items: as even as possible, the first ranks one more."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def shard(items: list[T]) -> list[T]:
    """This rank's contiguous share of `items` (all of them in a one-process run)."""
    if not is_distributed():
        return items
    r = shard_range(len(items))
    return items[r.start : r.stop]


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """With WORLD_SIZE > 1: a process group for the body (NCCL on cuda:LOCAL_RANK, else gloo), destroyed
    on exit, also on an error (peers blocked in a collective then fail instead of waiting). Yields the
    device this rank computes on. A group the caller already set up is used and left alone."""
    if env_world_size() <= 1 and not is_distributed():
        yield device
        return
    own = not dist.is_initialized()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if own:
        timeout = datetime.timedelta(minutes=timeout_minutes())
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout, **kwargs)
    log.info("data-parallel calibration: rank %d of %d on %s (%s)", rank(), world_size(), device,
             dist.get_backend())
    try:
        yield device
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


def timeout_minutes() -> float:
    value = os.environ.get("LLMC_DIST_TIMEOUT_MIN", "120")
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ConfigError(f"LLMC_DIST_TIMEOUT_MIN is {value!r}; set it to a positive number of minutes (default 120)")
    return minutes


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(tensors: Sequence[Tensor], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
    """Reduce `tensors` in place over all ranks (a no-op in a one-process run)."""
    if not is_distributed():
        return
    comm = _comm_device()
    for t in tensors:
        if t.device == comm:
            dist.all_reduce(t, op=op)
        else:
            moved = t.to(comm)
            dist.all_reduce(moved, op=op)
            t.copy_(moved)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def block_tensors(block: nn.Module) -> list[Tensor]:
    """Every parameter and buffer (persistent or not) of `block`, each once."""
    seen: dict[int, Tensor] = {}
    for module in block.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and t.numel() and t.device.type != "meta":
                seen.setdefault(id(t), t)
    return list(seen.values())


@torch.no_grad()
def broadcast_block(block: nn.Module, src: int = 0) -> None:
    """Make every rank's `block` bit-identical to rank `src`'s: one flat broadcast per dtype."""
    if not is_distributed():
        return
    comm = _comm_device()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in block_tensors(block):
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        tensors = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1).to(comm) for t in tensors])
        dist.broadcast(flat, src)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def reduce_ranges(lows: list[Tensor | None], highs: list[Tensor | None]
                  ) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """The min of each of `lows` and the max of each of `highs` (one value each) over ranks; None where
    no rank saw anything (None: nothing seen on this rank)."""
    if not is_distributed():
        return lows, highs
    device = next((t.device for t in [*lows, *highs] if t is not None), torch.device("cpu"))
    # -min and max in one MAX reduction
    def value(t: Tensor | None, sign: float) -> float:
        return -math.inf if t is None else sign * float(t.reshape(()))

    both = torch.tensor([[value(lo, -1.0), value(hi, 1.0)] for lo, hi in zip(lows, highs)], dtype=torch.float64)
    all_reduce([both], dist.ReduceOp.MAX)
    out_lo = [None if math.isinf(v) else torch.tensor([[-v]], device=device) for v in both[:, 0].tolist()]
    out_hi = [None if math.isinf(v) else torch.tensor([[v]], device=device) for v in both[:, 1].tolist()]
    return out_lo, out_hi


def split_perplexity(evaluate, windows: Tensor, dataset: str, position: str):
    """`evaluate(windows)` (a `PplResult`) on this rank's share of the windows, combined over ranks:
    PPL from the summed NLL and token counts, as one process would compute it up to float order."""
    from llmc.eval.perplexity import PplResult

    if not is_distributed():
        return evaluate(windows)
    r = shard_range(windows.shape[0])
    part = evaluate(windows[r.start : r.stop]) if len(r) else None
    stats = torch.tensor([part.nll * part.tokens_scored, part.tokens_scored] if part else [0.0, 0.0],
                         dtype=torch.float64)
    seconds = torch.tensor([part.seconds if part else 0.0], dtype=torch.float64)
    all_reduce([stats])
    all_reduce([seconds], dist.ReduceOp.MAX)
    total, count = stats.tolist()
    mean = total / count
    return PplResult(dataset=dataset, position=position, ppl=math.exp(mean), nll=mean, tokens_scored=int(count),
                     windows=int(windows.shape[0]), seq_len=int(windows.shape[1]), seconds=float(seconds.item()))


def sum_floats(values: Sequence[float]) -> list[float]:
    """Each of `values` summed over ranks (float64, one reduction); the values themselves in a one-process run."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    all_reduce([t])
    return t.tolist()


def gather_objects(obj: T) -> list[T]:
    """Every rank's picklable `obj`, in rank order (`[obj]` in a one-process run)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(rows: Tensor) -> Tensor:
    """Every rank's `rows` `[n_r, ...]` (n_r may differ, 0 too; the rest of the shape and the dtype alike)
    concatenated in rank order, on `rows`' device; `rows` itself in a one-process run."""
    if not is_distributed():
        return rows
    comm = _comm_device()
    counts = torch.tensor([rows.shape[0]], dtype=torch.int64, device=comm)
    sizes = [torch.zeros_like(counts) for _ in range(world_size())]
    dist.all_gather(sizes, counts)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=comm)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(rows.device)


def leading_batches(tokens: Iterable[int], limit: int) -> int:
    """How many leading batches of these real-token counts hold at most `limit` tokens (at least one)."""
    total = count = 0
    for i, n in enumerate(tokens):
        total += n
        if total > limit:
            return max(i, 1)
        count = i + 1
    return count


def leading_share(tokens: list[int], limit: int | None) -> tuple[int, int, int]:
    """The leading batches of the whole calibration set holding at most `limit` real tokens (`leading_batches`;
    all with None), from each rank's per-batch token counts (`tokens`: this rank's): how many of this rank's
    batches are among them, their tokens on the ranks before this one, and the tokens of them all."""
    per_rank = gather_objects(tokens)  # shards are contiguous, in rank order
    every = [n for part in per_rank for n in part]
    lead = len(every) if limit is None else leading_batches(every, limit)
    start = sum(len(part) for part in per_rank[: rank()])
    return min(max(lead - start, 0), len(tokens)), sum(every[: min(start, lead)]), sum(every[:lead])
