"""AWQ and SmoothQuant under data-parallel calibration (llmc.pipeline.distributed): two gloo processes pick
the one-process run's scales (the same grid point per group), clips (from the same sampled rows) and
quantized weights on the tiny Llama, and only rank 0 writes outputs. The clip run searches 3 of the 4
batches (rank 0 holds 2, rank 1 one) and samples every 3rd row, so the global search span and the
sampler's offset are exercised."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import (  # noqa: F401 (model_dir: a fixture)
    W4G32,
    dp_config,
    fake_weights,
    free_port,
    join_gloo_group,
    model_dir,
)

import llmc

pytestmark = pytest.mark.usefixtures("one_thread")

W8A8 = {"method": "SmoothQuant",
        "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
        "act": {"bit": 8, "symmetric": True, "granularity": "per_token", "static": False}}
RUNS = {
    # 4 batches of 64 tokens: 200 tokens search the first 3
    "awq_clip": {"method": "AWQ", "weight": W4G32, "special": {"search_tokens": 200}},
    "awq_noclip": {"method": "AWQ", "weight": W4G32, "special": {"weight_clip": False}},
    "smoothquant": W8A8,
}
CLIP_TOKENS = 50  # 192 searched tokens // 50: every 3rd row, rank 1's first at its local row 1


@contextlib.contextmanager
def recording():
    """What the methods choose: folded scales, AWQ's grid picks, clip samples and results, search spans."""
    from llmc.methods import awq, smoothquant

    rec: dict[str, list] = {"scales": [], "picks": [], "clips": [], "spans": []}
    saved = (awq.fold_scales, smoothquant.fold_scales, awq._first_min, awq.AWQ._clip_weight, awq.search_span,
             awq.AWQ.clip_tokens)

    def fold(prev, linears, scales, *args):
        rec["scales"].append(scales.detach().clone())
        return saved[0](prev, linears, scales, *args)

    def first_min(errors):
        index = saved[2](errors)
        rec["picks"].append(index)
        return index

    def clip_weight(self, w, x, q):
        out = saved[3](self, w, x, q)
        rec["clips"].append((x.clone(), out.clone()))
        return out

    def span(ctx, limit):
        s = saved[4](ctx, limit)
        rec["spans"].append((s.batches, s.offset, s.total))
        return s

    awq.fold_scales = smoothquant.fold_scales = fold
    awq._first_min, awq.AWQ._clip_weight, awq.search_span = first_min, clip_weight, span
    awq.AWQ.clip_tokens = CLIP_TOKENS
    try:
        yield rec
    finally:
        (awq.fold_scales, smoothquant.fold_scales, awq._first_min, awq.AWQ._clip_weight, awq.search_span,
         awq.AWQ.clip_tokens) = saved


def run(folder: Path, name: str, out: Path) -> dict:
    cfg = dp_config(folder, RUNS[name], out)
    del cfg["eval"]  # the choices and weights are compared; perplexity splitting is test_distributed's
    with recording() as rec:
        result = llmc.compress(cfg, progress=False)
    rec["state"] = {k: v.clone() for k, v in result.model.state_dict().items()}
    return rec


def worker(rank: int, port: int, folder: str, work: str) -> None:
    import torch.distributed as dist

    join_gloo_group(rank, port)
    work = Path(work)
    try:
        import llmc.runner

        calls: list[str] = []
        if rank > 0:  # rank 1 must neither print the table nor write outputs
            llmc.runner.write_outputs = lambda *a, **k: calls.append("write_outputs")
            llmc.runner.print_table = lambda *a, **k: calls.append("print_table")
        records = {name: run(Path(folder), name, work / name) for name in RUNS}
        torch.save(records, work / f"records{rank}.pt")
        (work / f"calls{rank}.json").write_text(json.dumps(calls))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(model_dir, tmp_path_factory) -> Path:  # noqa: F811
    work = tmp_path_factory.mktemp("dp-awq")
    mp.spawn(worker, args=(free_port(), str(model_dir), str(work)), nprocs=2, join=True)
    return work


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory) -> tuple[Path, dict]:  # noqa: F811
    work = tmp_path_factory.mktemp("one-awq")
    return work, {name: run(model_dir, name, work / name) for name in RUNS}


def assert_same_choices(name: str, one: dict, two: dict, exact: bool) -> None:
    assert two["picks"] == one["picks"], name  # the same grid point for every group
    assert len(two["scales"]) == len(one["scales"]) > 0
    for a, b in zip(two["scales"], one["scales"]):
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert len(two["clips"]) == len(one["clips"])
    for (x2, w2), (x1, w1) in zip(two["clips"], one["clips"]):
        assert x2.shape == x1.shape == (CLIP_TOKENS, x1.shape[1])  # the same rows sampled...
        torch.testing.assert_close(x2, x1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w2, w1, rtol=1e-5, atol=1e-6)  # ...and the same clip chosen


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_choose_what_one_does(spawned, one_process, name):
    ref_dir, ref = one_process
    recs = [torch.load(spawned / f"records{r}.pt")[name] for r in (0, 1)]
    exact = name == "smoothquant"  # a max is exact in any order; AWQ's sums differ in float order only
    for two in recs:
        assert_same_choices(name, ref[name], two, exact)
        assert two["state"].keys() == ref[name]["state"].keys()
        for key, value in ref[name]["state"].items():
            torch.testing.assert_close(two["state"][key], value, rtol=0, atol=1e-6, msg=key)
    assert all(torch.equal(recs[0]["state"][k], recs[1]["state"][k]) for k in recs[0]["state"])  # rank 0's block
    one_w, two_w = fake_weights(ref_dir / name), fake_weights(spawned / name)
    diff = max((one_w[k].float() - two_w[k].float()).abs().max().item() for k in one_w)
    print(f"{name}: 1 vs 2 processes, max abs fake-quant weight difference {diff:.3g}")
    assert one_w.keys() == two_w.keys()
    for key in one_w:
        if exact:
            assert torch.equal(two_w[key], one_w[key]), key
        else:
            torch.testing.assert_close(two_w[key], one_w[key], rtol=0, atol=1e-6)
    if name == "awq_clip":  # 3 searched batches of 64 tokens: rank 0 holds 2, rank 1 one, after 128 tokens
        assert set(ref[name]["spans"]) == {(3, 0, 192)}
        assert set(recs[0]["spans"]) == {(2, 0, 192)} and set(recs[1]["spans"]) == {(1, 128, 192)}
        assert ref[name]["clips"]


def test_outputs_written_once(spawned):
    assert json.loads((spawned / "calls1.json").read_text()) == []
    assert sorted(p.name for p in spawned.iterdir() if p.is_dir()) == sorted(RUNS)
    for name in RUNS:
        assert json.loads((spawned / name / "results.json").read_text())["world_size"] == 2


def test_sampler_offsets_give_the_one_process_rows():
    """Ranks sampling at their global offsets and concatenated in rank order give one process's sample."""
    from llmc.methods.awq_search import _Sampler

    torch.manual_seed(0)
    batches = [torch.randn(n, 4) for n in (7, 5, 9, 6)]
    total, n = sum(len(b) for b in batches), 6
    one = _Sampler(total, n, torch.device("cpu"))
    for b in batches:
        one.add(b)
    parts, offset = [], 0
    for shard in (batches[:2], batches[2:]):
        s = _Sampler(total, n, torch.device("cpu"), offset)
        for b in shard:
            s.add(b)
        parts.append(torch.cat(s.parts))
        offset += sum(len(b) for b in shard)
    expected = torch.cat(batches)[:: total // n][:n]
    assert torch.equal(one.rows(), expected)
    assert torch.equal(torch.cat(parts)[:n], expected)
