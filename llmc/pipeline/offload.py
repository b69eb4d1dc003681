"""Moving one block to the compute device and back into the host memory it came from.

`block.to("cpu")` allocates fresh host memory for every tensor of every block, and the first
write to fresh pages faults them in one by one: on a 7B model that made the trip back to the
host 4x slower than the trip out (1.2 vs 5 GB/s on an H100 host). `ModuleHome` remembers each
parameter's and buffer's host tensor when the block leaves and copies the device tensor back
into it on return, so the host memory is reused and already mapped. Tensors a method created
or reshaped on the device (quantizer scales, replaced modules) go home with `Tensor.to`.

On a CUDA device both trips can overlap the computation (`Prefetch`, `Departure`): a background
thread copies the next block's tensors to the device, and the finished block's back to the host,
on side streams while the current block runs (0.1 s of the 0.97 s per 7B GPTQ block were these
copies). It costs up to two more blocks of device memory, which the memory plan counts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def _tensors(block: nn.Module) -> Iterator[tuple[nn.Module, dict, str, Tensor]]:
    for module in block.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    yield module, table, name, tensor


class ModuleHome:
    """One module's trip: `leave()` moves it to `device`, `come_back()` returns it to its host tensors."""

    def __init__(self, block: nn.Module, device: torch.device) -> None:
        self.block = block
        self.device = device
        first = next((t for *_, t in _tensors(block)), None)
        self.home = first.device if first is not None else device
        self._params: dict[int, tuple[nn.Parameter, Tensor]] = {}
        self._buffers: dict[tuple[int, str], tuple[nn.Module, Tensor]] = {}

    @property
    def moves(self) -> bool:
        return self.home != self.device

    def leave(self, prefetched: dict[int, Tensor] | None = None) -> None:
        """Move the block to the device; `prefetched` (`Prefetch.take()`): device copies of its host
        tensors by id, used instead of copying again."""
        if not self.moves:
            return
        for module, _table, name, tensor in _tensors(self.block):
            if isinstance(tensor, nn.Parameter):
                self._params[id(tensor)] = (tensor, tensor.data)
            else:
                self._buffers[(id(module), name)] = (module, tensor)
        if not prefetched:
            self.block.to(self.device)
            return
        with torch.no_grad():
            for _module, table, name, tensor in list(_tensors(self.block)):
                copy = prefetched.get(id(tensor))
                if copy is None:
                    copy = tensor.to(self.device)
                if isinstance(tensor, nn.Parameter):
                    tensor.data = copy
                else:
                    table[name] = copy

    def come_back(self, staged: bool = False) -> None:
        """With `staged` (a background thread's trip), each tensor goes through pinned host memory (see
        `staged_to`); the caller's stream must be the one the copies are ordered on."""
        if not self.moves:
            return
        with torch.no_grad():
            for module, table, name, tensor in list(_tensors(self.block)):
                if tensor.device == self.home:
                    continue
                is_param = isinstance(tensor, nn.Parameter)
                entry = self._params.get(id(tensor)) if is_param else self._buffers.get((id(module), name))
                host = entry[1] if entry is not None else None
                if host is not None and host.shape == tensor.shape and host.dtype == tensor.dtype:
                    host.copy_(staged_to(tensor.detach(), self.home) if staged else tensor.detach())
                else:
                    host = tensor.detach().to(self.home)
                if is_param:
                    tensor.data = host
                else:
                    table[name] = host
        self._params.clear()
        self._buffers.clear()


def staged_to(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` copied between pageable host memory and a CUDA device through pinned host memory.

    A copy from or to pageable memory is staged by the driver, which holds a lock the pipeline
    thread's kernel launches wait on: copies in a background thread then stalled each launch for
    5-20 ms at the start of every 7B block (an H200 profile). Pinned memory (torch's caching host
    allocator: reused once its copy is done) makes the device side a plain DMA, and the host-side
    copy a `memcpy` that holds no lock. From the device, the returned pinned copy is complete once
    the current stream is synchronized (done here).
    """
    if tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return pinned


class _Background:
    """`work()` in a daemon thread on a side CUDA stream of `device`; `join()` re-raises its error."""

    def __init__(self, device: torch.device, work) -> None:
        self.stream = torch.cuda.Stream(device)
        self.error: BaseException | None = None
        self._work = work
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with torch.cuda.stream(self.stream):
                self._work()
        except BaseException as exc:  # re-raised in the pipeline's thread by join()
            self.error = exc
        finally:
            self._work = None  # the work's owner holds this object: no reference cycle keeps its tensors

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


class Prefetch:
    """Device copies of a block's host tensors, made in the background while the previous block runs.

    `take()` waits for them and returns those whose host tensor was not changed meanwhile (same
    storage, same version counter) for `ModuleHome.leave`; the others are copied again there."""

    def __init__(self, block: nn.Module, device: torch.device) -> None:
        self.device = device
        sources = {id(t): t for *_, t in _tensors(block) if t.device != device}
        self.sources = [(t, t.data_ptr(), t._version) for t in sources.values()]
        self.copies: dict[int, Tensor] = {}
        self.event = torch.cuda.Event()
        self.work = _Background(device, self._copy)

    def _copy(self) -> None:
        with torch.no_grad():
            for tensor, *_ in self.sources:
                self.copies[id(tensor)] = staged_to(tensor.detach(), self.device)
        self.event.record()

    def take(self) -> dict[int, Tensor]:
        try:
            self.work.join()
        except Exception:  # e.g. out of memory in the background: the trip copies the block itself
            return {}
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.event)
        taken = {}
        for tensor, ptr, version in self.sources:
            copy = self.copies.get(id(tensor))
            if copy is not None and tensor.data_ptr() == ptr and tensor._version == version:
                copy.record_stream(current)  # made on the side stream, used and freed on this one
                taken[id(tensor)] = copy
        self.copies, self.sources = {}, []  # the block owns the copies now; a stale one is freed here
        return taken


class Departure:
    """`trip.come_back()` in the background once the work queued so far on the device is done."""

    def __init__(self, trip: ModuleHome) -> None:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(trip.device))

        def come_back() -> None:
            torch.cuda.current_stream(trip.device).wait_event(done)
            trip.come_back(staged=True)

        self.work = _Background(trip.device, come_back)

    def join(self) -> None:
        self.work.join()


class BlockTrips:
    """The trips of the block loop: `arrive(i)` puts block i on the device, `depart(trip)` sends it
    back. With `overlap` (a CUDA device, blocks in host memory) block i+1 is prefetched while block
    i runs and block i goes home while block i+1 runs; `close()` waits for what is still moving.
    `store` (a disk-streamed model's `BlockStore`) reads and releases blocks itself, not overlapped."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, overlap: bool = False, store=None) -> None:
        self.blocks, self.device, self.store = blocks, device, store
        self.overlap = overlap and device.type == "cuda" and store is None
        self._prefetch: tuple[int, Prefetch] | None = None
        self._departure: Departure | None = None

    def arrive(self, index: int):
        block = self.blocks[index]
        if self.store is not None:
            trip = self.store.trip(index, block, self.device)
            trip.leave()
            return trip
        prefetched = None
        if self._prefetch is not None:
            ahead, prefetch = self._prefetch
            self._prefetch = None
            prefetched = prefetch.take() if ahead == index else None
        trip = ModuleHome(block, self.device)
        trip.leave(prefetched)
        if self.overlap and trip.moves and index + 1 < len(self.blocks):
            self._prefetch = (index + 1, Prefetch(self.blocks[index + 1], self.device))
        return trip

    def depart(self, trip) -> None:
        if not (self.overlap and isinstance(trip, ModuleHome) and trip.moves):
            trip.come_back()
            return
        self._wait_departure()
        self._departure = Departure(trip)

    def _wait_departure(self) -> None:
        departure, self._departure = self._departure, None
        if departure is not None:
            departure.join()

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch[1].take()  # dropped: the loop ended before that block
            self._prefetch = None
        self._wait_departure()


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run the body with `module` on `device`; afterwards it is back in its host tensors."""
    home = ModuleHome(module, device)
    home.leave()
    try:
        yield module
    finally:
        home.come_back()
