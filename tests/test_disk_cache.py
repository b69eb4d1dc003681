"""The activation cache on disk (`base.act_cache: disk`, llmc.pipeline.disk_cache): results equal an
in-memory cache's bit for bit, the cache folder is removed after a run and after a failed one, at
most two generations of hidden states are on disk at once, and host memory stays near one batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from test_streaming import PROBE, save_llama, tensors

from llmc import compress
from llmc.pipeline import disk_cache
from llmc.pipeline.disk_cache import DiskCache
from llmc.pipeline.planner import plan_memory

pytestmark = pytest.mark.usefixtures("one_thread")

W4 = {"bit": 4, "group_size": 32, "symmetric": False, "granularity": "per_group"}


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> str:
    """A small calibration file: tokenizing all of the bundled WikiText-2 takes seconds and 280 MB."""
    from llmc.data import bundled_path, read_documents

    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text("\n".join(read_documents(bundled_path("wikitext2", "calib"))[:200]))
    return str(text)


@pytest.fixture
def on_disk(monkeypatch):
    """Every write to the disk cache: the number of cache files present after it."""
    seen: list[int] = []
    original = disk_cache.DiskHidden.append

    def append(self, hidden):
        original(self, hidden)
        seen.append(len(list(self.cache.folder.iterdir())))

    monkeypatch.setattr(disk_cache.DiskHidden, "append", append)
    return seen


def run(model_dir, out, method, cache, cache_dir, calib_text, evaluate=True):
    cfg = tiny_config(model_dir, quant={"method": method, "weight": W4},
                      save={"save_path": str(out), "save_fake": True})
    cfg["calib"].update(name="custom", path=calib_text, n_samples=6, bs=2)  # 3 batches
    cfg["eval"] = {**cfg["eval"], "max_windows": 1, "seq_len": 64} if evaluate else None
    cfg["base"].update(act_cache=cache, act_cache_dir=str(cache_dir) if cache == "disk" else None)
    return compress(cfg, progress=False)


def peak_rss(cfg: dict) -> dict:
    """tests/test_streaming.py's probe, with glibc returning freed large blocks to the system at once
    (its default keeps up to tens of MB of freed attention scores, which would hide the difference)."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cfg)], capture_output=True, text=True, timeout=240,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["GPTQ", "AWQ"])
def test_disk_cache_gives_the_in_memory_results_bit_for_bit(tmp_path, tiny_llama_dir, calib_text, on_disk, method):
    memory = run(tiny_llama_dir, tmp_path / "cpu", method, "cpu", tmp_path / "cache", calib_text)
    assert not on_disk
    disk = run(tiny_llama_dir, tmp_path / "disk", method, "disk", tmp_path / "cache", calib_text)
    # block 0's inputs and 3 blocks' outputs, 3 batches each; never more than inputs and outputs at once
    assert len(on_disk) == 4 * 3 and max(on_disk) == 2 * 3
    a, b = tensors(tmp_path / "cpu" / "fake_quant_model"), tensors(tmp_path / "disk" / "fake_quant_model")
    assert set(a) == set(b)
    for key in a:
        assert a[key].view(torch.uint8).equal(b[key].view(torch.uint8)), key
    assert [r.ppl for r in disk.perplexity] == [r.ppl for r in memory.perplexity]
    assert memory.perplexity[-1].ppl != memory.perplexity[0].ppl  # quantization changed something
    assert list((tmp_path / "cache").iterdir()) == []  # the run's cache folder is gone


def test_default_cache_folder_is_beside_save_path_and_removed(tmp_path, tiny_llama_dir, calib_text, monkeypatch):
    made = []
    original = DiskCache.path

    def path(self, generation, index):
        made.append(original(self, generation, index).parent)
        return made[-1] / f"g{generation}-b{index}.bin"

    monkeypatch.setattr(DiskCache, "path", path)
    cfg = tiny_config(tiny_llama_dir, quant={"method": "GPTQ", "weight": W4},
                      save={"save_path": str(tmp_path / "out"), "save_fake": True})
    cfg["base"]["act_cache"] = "disk"
    cfg["calib"].update(name="custom", path=calib_text)
    cfg["eval"] = None
    compress(cfg, progress=False)
    assert made and {p.parent for p in made} == {tmp_path}
    assert made[0].name.startswith(disk_cache.PREFIX) and not made[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_run_removes_its_cache_folder(tmp_path, tiny_llama_dir, calib_text, on_disk, monkeypatch):
    from llmc.methods.gptq import GPTQ

    original = GPTQ.process_block

    def fail_at_block_1(self, ctx):
        if ctx.index == 1:
            raise RuntimeError("solver exploded")
        original(self, ctx)

    monkeypatch.setattr(GPTQ, "process_block", fail_at_block_1)
    with pytest.raises(RuntimeError, match="solver exploded"):
        run(tiny_llama_dir, tmp_path / "out", "GPTQ", "disk", tmp_path / "cache", calib_text, evaluate=False)
    assert on_disk  # it did write
    assert list((tmp_path / "cache").iterdir()) == []


def test_plan_puts_the_cache_on_disk_out_of_host_memory(tiny_llama_dir):
    from conftest import build_tiny_model

    from llmc.models import get_adapter

    model = build_tiny_model("llama", 384)
    blocks = get_adapter("auto", "llama").get_blocks(model)
    args = (model, blocks, 64, 128, 4, torch.device("cpu"))
    cpu = plan_memory(*args, cache_policy="cpu")
    disk = plan_memory(*args, cache_policy="disk", cache_dir="/scratch/cache")
    assert cpu.cache_on_device and cpu.cache_dir is None  # on a CPU run host memory is the device's
    assert not disk.cache_on_device and disk.cache_dir == "/scratch/cache"
    assert cpu.peak_host - disk.peak_host == cpu.cache_bytes - 2 * cpu.cache_bytes // 16
    assert "activation cache 0.00 on disk in /scratch/cache" in disk.describe()
    assert plan_memory(*args, cache_policy="disk").cache_dir  # the system temp dir by default


def test_disk_cache_keeps_host_memory_near_one_batch(tmp_path, tiny_tokenizer, calib_text):
    """A 1-block model of 50 kB whose activation cache is 2 x 96 MiB (fp32, hidden 32, 786k tokens):
    the in-memory cache's peak RSS grows by about both generations, the disk cache's by the batches in
    flight and the calibration data."""
    model_dir = save_llama(tmp_path / "model", tiny_tokenizer, layers=1, hidden=32, inter=64, heads=2, kv=2)
    n_samples, seq_len = 12288, 64
    generation = n_samples * seq_len * 32 * 4
    peaks = {}
    for cache in ("cpu", "disk"):
        cache_dir = str(tmp_path / "cache") if cache == "disk" else None
        cfg = {"base": {"seed": 0, "device": "cpu", "act_cache": cache, "act_cache_dir": cache_dir},
               "model": {"path": str(model_dir), "torch_dtype": "float32"},
               "calib": {"name": "custom", "path": calib_text, "n_samples": n_samples, "seq_len": seq_len, "bs": 64},
               "quant": {"method": "GPTQ", "weight": W4, "special": {"true_sequential": False}}}
        peaks[cache] = peak_rss(cfg)
    grow = {c: p["peak"] - p["base"] for c, p in peaks.items()}
    print({c: (round(p["base"] / 2**20), round(p["peak"] / 2**20), round(p["plan"] / 2**20))
           for c, p in peaks.items()}, round(generation / 2**20))
    assert grow["cpu"] > 1.5 * generation
    assert grow["disk"] < 0.6 * generation
    assert grow["cpu"] - grow["disk"] > generation
    assert peaks["cpu"]["plan"] - peaks["disk"]["plan"] > 1.5 * generation
    for p in peaks.values():
        assert p["plan"] == pytest.approx(p["peak"], rel=0.2)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_cache_dir_without_the_disk_cache_is_refused(tiny_llama_dir):
    from llmc.errors import ConfigError

    cfg = tiny_config(tiny_llama_dir, quant={"method": "RTN", "weight": W4})
    cfg["base"].update(act_cache="cpu", act_cache_dir="/scratch")
    with pytest.raises(ConfigError, match=r"act_cache_dir is used only with act_cache: disk .*set act_cache: disk"):
        compress(cfg, progress=False)
