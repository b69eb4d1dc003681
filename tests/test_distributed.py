"""Data-parallel calibration (llmc.pipeline.distributed): two gloo processes on CPU give the one-process
result (GPTQ up to float summation order, RTN with static activation ranges exactly), the Hessian
reduced over ranks is the one-process Hessian, blocks are broadcast from rank 0, rank 1 writes nothing,
and methods without data-parallel support are refused before the model loads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from conftest import tiny_config
from safetensors.torch import load_file

import llmc
from llmc.errors import ConfigError
from llmc.pipeline.distributed import shard_range

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
W4G32 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
GPTQ = {"method": "GPTQ", "weight": W4G32}
RTN_STATIC = {"method": "RTN", "weight": W4G32,
              "act": {"bit": 8, "symmetric": False, "granularity": "per_tensor", "static": True}}


def dp_config(model_dir: Path, quant: dict, save: Path | None) -> dict:
    """8 samples x 32 tokens in 4 batches (2 per rank); 3 eval windows (split 2 + 1). The text is a few
    WikiText-2 paragraphs beside the model (tokenizing the whole bundled sets would take most of the time)."""
    cfg = tiny_config(model_dir, quant=quant)
    text = str(Path(model_dir).parent / "text.txt")
    cfg["calib"] = {"name": "custom", "path": text, "n_samples": 8, "seq_len": 32, "bs": 2}
    cfg["eval"] = {"eval_pos": ["pretrain", "fake_quant"], "name": "custom", "path": text, "seq_len": 64,
                   "max_windows": 3}
    if save is not None:
        cfg["save"] = {"save_path": str(save), "save_fake": True}
    return cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny Llama with a small text file beside it."""
    from conftest import build_tiny_model

    from llmc.data import bundled_path, read_documents

    folder = tmp_path_factory.mktemp("dp-model") / "tiny-llama"
    build_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    docs = [d.strip() for d in read_documents(bundled_path("wikitext2", "calib")) if len(d.strip()) > 200]
    (folder.parent / "text.txt").write_text("\n".join(docs[:40]) + "\n")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_weights(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted((out / "fake_quant_model").glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors
    return tensors


def ppls(out: Path) -> list[float]:
    return [r["ppl"] for r in json.loads((out / "results.json").read_text())["perplexity"]]


# ---- the worker of the spawned two-process run ------------------------------------------------------


def join_gloo_group(rank: int, port: int) -> None:
    """A spawned worker joins the two-process gloo group, as torchrun's environment would set it up."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)


def worker(rank: int, port: int, model_dir: str, work: str) -> None:
    import torch.distributed as dist

    join_gloo_group(rank, port)
    work = Path(work)
    try:
        check_broadcast(rank, work)
        torch.save(block0_hessians(Path(model_dir), sharded=True), work / f"hessians{rank}.pt")
        import llmc.runner

        if rank > 0:  # rank 1 must neither print the table nor write outputs
            calls = []
            llmc.runner.write_outputs = lambda *a, **k: calls.append("write_outputs")
            llmc.runner.print_table = lambda *a, **k: calls.append("print_table")
        result = llmc.compress(dp_config(Path(model_dir), RTN_STATIC, work / "rtn2"), progress=False)
        state = dict(result.model.state_dict())
        state.update({f"{n}.a_scale": m.a_scale for n, m in result.model.named_modules() if hasattr(m, "a_scale")})
        torch.save(state, work / f"rtn_state{rank}.pt")
        if rank > 0:
            (work / "rank1_calls.json").write_text(json.dumps(calls))
        assert dist.is_initialized()  # compress leaves a process group it did not create alone
    finally:
        dist.destroy_process_group()


def check_broadcast(rank: int, work: Path) -> None:
    """broadcast_block makes rank 1's parameters and buffers (persistent or not, any dtype) rank 0's."""
    from llmc.pipeline.distributed import broadcast_block

    torch.manual_seed(rank)
    block = torch.nn.Linear(8, 4)
    block.register_buffer("scale", torch.randn(4, 1), persistent=False)
    block.register_buffer("idx", torch.arange(8) * (rank + 1))
    broadcast_block(block)
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 4)
    same = (torch.equal(block.weight, reference.weight) and torch.equal(block.bias, reference.bias)
            and torch.equal(block.scale, torch.randn(4, 1)) and torch.equal(block.idx, torch.arange(8)))
    (work / f"broadcast{rank}.json").write_text(json.dumps(same))


def block0_hessians(model_dir: Path, sharded: bool) -> list[torch.Tensor]:
    """Block 0's Hessians (GPTQ's group_hessians) from this rank's share of the calibration batches."""
    from llmc.config.loader import load_config
    from llmc.data import build_calibration, load_named_documents
    from llmc.methods.hessian import group_hessians
    from llmc.models import load_model
    from llmc.pipeline import BlockContext, capture_block_inputs
    from llmc.pipeline.distributed import shard

    cfg = load_config(dp_config(model_dir, GPTQ, None))
    loaded = load_model(cfg.model)
    c = cfg.calib
    docs = load_named_documents(c.name, "calib", c.path, c.download, c.text_key)
    batches = build_calibration(docs, loaded.tokenizer, c.n_samples, c.seq_len, c.bs, c.preproc, cfg.calib_seed)
    if sharded:
        batches = shard(batches)
    cpu = torch.device("cpu")
    inputs = capture_block_inputs(loaded.model, loaded.adapter, batches, cpu)
    block = loaded.adapter.get_blocks(loaded.model)[0]
    ctx = BlockContext(0, block, loaded.adapter, inputs.for_block(0), cpu,
                       loaded.adapter.block_linear_names(block))
    groups = [list(mods.items()) for _, mods in ctx.groups()]
    return group_hessians(ctx, groups)[0]


@pytest.fixture(scope="module")
def spawned(model_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dp")
    mp.spawn(worker, args=(free_port(), str(model_dir), str(work)), nprocs=2, join=True)
    return work


# ---- tests -------------------------------------------------------------------------------------------


def test_shard_is_contiguous_and_even():
    for n, parts in [(10, 4), (4, 2), (3, 2), (7, 3)]:
        ranges = [shard_range(n, parts, i) for i in range(parts)]
        assert [i for r in ranges for i in r] == list(range(n))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_broadcast_block(spawned):
    assert [json.loads((spawned / f"broadcast{r}.json").read_text()) for r in (0, 1)] == [True, True]


def test_hessian_all_reduce_equals_one_process(spawned, model_dir):
    one = block0_hessians(model_dir, sharded=False)
    for rank in (0, 1):
        two = torch.load(spawned / f"hessians{rank}.pt")
        assert len(two) == len(one) == 4  # q/k/v, o, gate/up, down
        for h2, h1 in zip(two, one):
            torch.testing.assert_close(h2, h1, rtol=1e-5, atol=1e-6)
    h0, h1 = (torch.load(spawned / f"hessians{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(h0, h1))  # every rank solves from the same statistics


def test_rtn_static_two_processes_equal_one_exactly(spawned, model_dir, tmp_path):
    out = tmp_path / "rtn1"
    one = llmc.compress(dp_config(model_dir, RTN_STATIC, out), progress=False)
    ref = fake_weights(out)
    got = fake_weights(spawned / "rtn2")
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    scales = {n: m.a_scale for n, m in one.model.named_modules() if hasattr(m, "a_scale")}
    assert scales
    states = [torch.load(spawned / f"rtn_state{rank}.pt") for rank in (0, 1)]
    for state in states:  # static activation ranges: min/max over ranks = over all batches
        for name, scale in scales.items():
            assert torch.equal(state[f"{name}.a_scale"], scale), name
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # both ranks hold the same model
    results = json.loads((spawned / "rtn2" / "results.json").read_text())
    assert results["world_size"] == 2
    assert json.loads((out / "results.json").read_text())["world_size"] == 1
    # perplexity windows split 2 + 1 over the ranks, NLL summed: the one-process value up to float order
    assert ppls(spawned / "rtn2") == pytest.approx(ppls(out), rel=1e-9)


def test_rank1_writes_nothing(spawned):
    assert json.loads((spawned / "rank1_calls.json").read_text()) == []
    outputs = sorted(p.name for p in spawned.iterdir() if p.is_dir())
    assert outputs == ["rtn2"]  # one output folder, no temporary or checkpoint folders left


def test_torchrun_cli_gptq_matches_one_process(model_dir, tmp_path):
    """`python -m torch.distributed.run --nproc-per-node 2 -m llmc run CFG`: GPTQ W4 g32 equals the
    one-process run up to the order of the Hessian's float sums."""
    one = tmp_path / "one"
    llmc.compress(dp_config(model_dir, GPTQ, one), progress=False)
    two = tmp_path / "two"
    run_torchrun(dp_config(model_dir, GPTQ, two), tmp_path)
    assert_matches_one_process(one, two)


def test_torchrun_streamed_gptq_matches_one_process(model_dir, tmp_path):
    """model.stream under torchrun: each rank reads its blocks from the checkpoint, rank 0 writes them, and
    every rank evaluates fake_quant from rank 0's written blocks; the result is the one-process streamed run's."""
    config = {}
    for run in ("one", "two"):
        config[run] = dp_config(model_dir, GPTQ, tmp_path / run)
        config[run]["model"]["stream"] = True
    llmc.compress(config["one"], progress=False)
    run_torchrun(config["two"], tmp_path)
    assert_matches_one_process(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]  # no staging folder left


def run_torchrun(config: dict, work: Path) -> None:
    """`llmc run` of `config` under torchrun with 2 gloo processes; rank 0 alone prints the table."""
    cfg = work / "run.yml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "llmc", "run", str(cfg)],
        capture_output=True, text=True, env=env, timeout=240, cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("position     dataset") == 1


def assert_matches_one_process(one: Path, two: Path) -> None:
    """GPTQ W4 g32 weights equal up to the order of the Hessian's float sums, and so do the perplexities."""
    ref, got = fake_weights(one), fake_weights(two)
    diff = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    print(f"GPTQ W4 g32, 1 vs 2 processes: max abs weight difference {diff:.3g}")
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-5)
    assert json.loads((two / "results.json").read_text())["world_size"] == 2
    assert ppls(two) == pytest.approx(ppls(one), rel=1e-5)


def test_unsupported_method_refused_before_loading(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    refused = {"method": "OmniQuant", "weight": W4G32}
    cfg = dp_config(tmp_path / "no-such-model", refused, None)  # refused before the (missing) model is looked at
    with pytest.raises(ConfigError, match=r"^method OmniQuant does not support data-parallel calibration yet; run it on "
                                          r"one process \(without torchrun\)$"):
        llmc.compress(cfg, progress=False)
    from llmc.cli import main

    cfg_file = tmp_path / "omniquant.yml"
    cfg_file.write_text(yaml.safe_dump(dp_config(model_dir, refused, None)))
    assert main(["run", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llmc: error (rank 0): method OmniQuant does not support data-parallel calibration yet; run it on one "
                   "process (without torchrun)"]
    one_batch = dp_config(model_dir, GPTQ, None)
    one_batch["calib"]["bs"] = -1
    with pytest.raises(ConfigError, match="calib gives 1 batch.*for 2 processes"):
        llmc.compress(one_batch, progress=False)



PEER_FAILS = """
import sys, torch
from llmc.pipeline import distributed
with distributed.process_group(torch.device("cpu")):
    if distributed.rank() == 1:
        sys.exit("rank 1 fails")
    distributed.all_reduce([torch.ones(3)])  # rank 1 never joins this one
"""


def test_a_failing_rank_does_not_hang_the_others():
    """The failing rank destroys the process group on its way out; rank 0, waiting in a collective,
    fails at once instead of waiting for the timeout."""
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", PEER_FAILS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                         "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                         "LLMC_DIST_TIMEOUT_MIN": "5"})
        for r in (0, 1)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    assert "rank 1 fails" in results[1][1]
    assert "Connection" in results[0][1] or "closed" in results[0][1].lower()
