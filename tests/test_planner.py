"""The memory planner: its estimate follows the schedule, and a run that cannot fit is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from llmc.errors import LlmcError
from llmc.models import get_adapter
from llmc.pipeline.planner import GIB, MemoryPlan, check_fits, plan_memory


def _block_bytes(block: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))


def test_plan_counts_one_block_the_cache_and_the_transients():
    model = build_tiny_model("llama", 384)
    blocks = get_adapter("auto", "llama").get_blocks(model)
    plan = plan_memory(model, blocks, n_samples=8, seq_len=32, batch_size=2, device=torch.device("cpu"))
    largest = 128 * 64  # the widest linear (gate/up/down) in float32
    assert plan.block_bytes == _block_bytes(blocks[0])
    assert plan.cache_bytes == 2 * 8 * 32 * 64 * 4  # inputs and outputs of every sample, float32
    linear_weights = sum(m.weight.numel() for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)) * 4
    # batch activations, float32 copies of the largest weight, the block's reused quantized weights
    assert plan.transient_bytes == 2 * 32 * (128 + 128 + 64) * 4 * 2 + 3 * 4 * largest + linear_weights
    assert plan.cache_on_device and plan.device_total is None and plan.batches == 4
    assert plan.peak_device == plan.block_bytes + plan.cache_bytes + plan.transient_bytes
    assert "peak device" in plan.describe() and "peak host" in plan.describe()


def test_data_free_plan_counts_one_float_copy_of_the_largest_weight():
    model = build_tiny_model("llama", 384)
    blocks = get_adapter("auto", "llama").get_blocks(model)
    plan = plan_memory(model, blocks, n_samples=0, seq_len=0, batch_size=0, device=torch.device("cpu"))
    assert plan.cache_bytes == 0 and plan.transient_bytes == 4 * 128 * 64


def _plan(device_total: int, on_device: bool = True) -> MemoryPlan:
    return MemoryPlan(block_bytes=GIB, cache_bytes=8 * GIB, transient_bytes=GIB, method_bytes=2 * GIB,
                      cache_on_device=on_device, device_total=device_total, host_model_bytes=20 * GIB, batches=32)


def test_a_run_that_does_not_fit_is_refused_with_what_to_change():
    with pytest.raises(LlmcError, match=r"12\.0 GiB does not fit the 10\.0 GiB .*calib\.n_samples.*act_cache: cpu"):
        check_fits(_plan(10 * GIB), torch.device("cuda"))
    check_fits(_plan(80 * GIB), torch.device("cuda"))  # fits: no error


def test_host_cache_keeps_two_batches_on_the_device():
    plan = _plan(10 * GIB, on_device=False)
    assert plan.peak_device == GIB + 2 * (8 * GIB // 32) + GIB + 2 * GIB
    assert plan.peak_host == 28 * GIB
    check_fits(plan, torch.device("cuda"))


def test_replay_bytes_count_only_with_the_cache_on_the_device():
    """What a method keeps to replay (GPTQ's children) needs the activations on the device: an
    offloaded cache's plan leaves it out."""
    from llmc.pipeline.planner import MemoryPlan

    base = dict(block_bytes=10, cache_bytes=100, transient_bytes=5, method_bytes=7, device_total=None,
                host_model_bytes=0, batches=4, replay_bytes=1000)
    on, off = MemoryPlan(cache_on_device=True, **base), MemoryPlan(cache_on_device=False, **base)
    assert on.peak_device == 10 + 100 + 5 + 7 + 1000
    assert off.peak_device == 10 + 2 * 100 // 4 + 5 + 7


def test_overlapped_trips_count_their_pinned_staging_in_host_memory():
    from llmc.pipeline.planner import MemoryPlan

    base = dict(block_bytes=10, cache_bytes=100, transient_bytes=5, method_bytes=7, device_total=None,
                host_model_bytes=1000, batches=4, cache_on_device=True)
    assert MemoryPlan(overlap=True, **base).peak_host - MemoryPlan(overlap=False, **base).peak_host == 2 * 10
