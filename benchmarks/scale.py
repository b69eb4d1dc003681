"""Issue 17's benchmarks: data-parallel calibration on 1 and N GPUs (llmc and llm-compressor), host memory
of in-memory and disk-streamed 70B-shaped models. Every row runs in its own process (its host peak RSS
is its own), and is written to <out>.json and <out>.md as soon as it is done; --resume skips the rows
already there, so a run cut by a device call's limit continues in the next call.

    # 2 GPUs (h200-x2): 7B and 8B shapes, GPTQ/RTN (AWQ if it supports data-parallel) on 1 and 2 GPUs,
    # then llm-compressor's data-parallel GPTQ on the same 2 GPUs
    python benchmarks/scale.py --tag h200x2 --rows dp,peer --shapes llama2-7b,llama3-8b --gpus 1,2
    # 1 GPU (h200): 70B shape truncated to 2 and 4 layers, in memory and streamed; then 24 streamed layers
    python benchmarks/scale.py --tag h200 --rows host,disk --host-layers 2,4 --disk-layers 24

Rows (key = kind/shape/layers/run/where):
- dp: llmc on `--gpus` (1: a plain process; N > 1: torchrun, NCCL on CUDA, gloo on CPU) with 128 x 2048
  calibration tokens, bf16, time as speed.py's llmc_run (capture + blocks; load excluded). An N-GPU row
  records how its probe linears' fake-quantized weights (first and last block's q_proj and down_proj)
  differ from the 1-GPU row's (`agreement`).
- peer: llm-compressor GPTQ W4 g128 (benchmarks/peer_scale.py under torchrun, its "Distributed Oneshot";
  1 GPU: benchmarks/peer_speed.py).
- host: the 70B shape truncated to `--host-layers`, model in memory and model.stream; host peak RSS
  (VmHWM) fitted linearly in the layer count and extrapolated to 80 layers.
- disk: model.stream on `--disk-layers` layers written one shard at a time (benchmarks/scale_models.py),
  its time extrapolated to 80 layers (capture + 80 x mean block time after the first).
- diskdp: the disk row data-parallel under torchrun (every rank streams the blocks), on each `--gpus` count above 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402
from scale_models import OutOfTime, checkpoint, drop_page_cache, tensor_shapes  # noqa: E402
from scale_report import agreement, save  # noqa: E402
from speed import RUNS, SHAPES, build_model  # noqa: E402

HERE = Path(__file__).resolve().parent
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Forced off in every row's processes: the lent GPU machines require NVLink multicast off."""


def launch(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run `cmd` in its own process group (killed whole at `timeout`); (return code, stderr tail)."""
    env = {**os.environ, **NO_MULTICAST}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        _, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return -9, "timed out"
    sys.stderr.write(err[-4000:])
    return proc.returncode, err


def torchrun(gpus: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
            "--monitor-interval=0.1"]


GUESS_S = {"dp/gptq": 75, "dp/rtn": 35, "dp/awq": 120, "peer/gptq": 240, "host/": 60}
"""Rough wall time of a 7B row on an H200 (load included), when no earlier row of its kind says better."""


def guess_s(key: str, rows: list[dict]) -> float:
    """How long row `key` may take: the wall time of a finished row of the same kind, shape and run (any
    GPU count), else GUESS_S (disk rows: 10 s per layer), plus a third."""
    kind, shape, *rest = key.split("/")
    run = rest[-2] if kind in ("host", "disk") else rest[0]
    seen = [r["wall_s"] for r in rows if r.get("kind") == kind and r.get("shape") == shape
            and r.get("run") == run and "wall_s" in r and "error" not in r]
    if kind == "disk":
        return 30 + 10 * int(rest[0].rstrip("l"))
    base = max(seen) if seen else GUESS_S.get(f"{kind}/{run}", GUESS_S.get(f"{kind}/", 60))
    return 1.33 * base


def not_data_parallel(run: str) -> str | None:
    """The first method of `run` that does not declare data_parallel (checked now: methods gain it)."""
    import llmc.schedule  # noqa: F401 -- registers the methods
    from llmc.methods.base import method_class

    names = RUNS[run]["quant"]["method"]
    for name in [names] if isinstance(names, str) else names:
        if not getattr(method_class(name), "data_parallel", False):
            return name
    return None


class Bench:
    """The rows asked for, in order, each in its own process, saved as they finish."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out or f"benchmarks/results/scale_{args.tag}")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.root = Path(args.model_root)
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else None
        command = "python " + " ".join(sys.argv)
        old = json.loads(self.out.with_suffix(".json").read_text()) if args.resume and \
            self.out.with_suffix(".json").exists() else None
        self.data = old or {"tag": args.tag, "n_samples": args.n_samples, "seq_len": args.seq_len, "bs": args.bs,
                            "commands": [], "rows": [], "notes": []}
        self.data["environment"] = environment()
        self.data["commands"].append(command)
        self.data["environment"]["gpus"] = torch.cuda.device_count()
        # failed and skipped rows are tried again (a method may have gained data-parallel support)
        self.data["rows"] = [r for r in self.data["rows"] if "error" not in r and "skipped" not in r]
        save(self.out, self.data)

    def done(self, key: str) -> bool:
        return any(r["key"] == key for r in self.data["rows"])

    def remaining(self) -> float:
        return self.deadline - time.monotonic() if self.deadline else 1e6

    def add(self, row: dict) -> None:
        row.setdefault("commit", self.data["environment"].get("commit"))
        self.data["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("per_block_s", "ranks")}), flush=True)
        save(self.out, self.data)

    def common(self) -> list[str]:
        a = self.args
        return ["--n-samples", str(a.n_samples), "--seq-len", str(a.seq_len), "--bs", str(a.bs)]

    def fits(self, key: str) -> bool:
        need = max(self.args.min_row_s, guess_s(key, self.data["rows"]) if self.args.guess else 0)
        if self.remaining() >= need:
            return True
        print(f"{key}: left for the next call ({self.remaining():.0f} s of the budget left, it may take "
              f"{need:.0f} s)", flush=True)
        return False

    def execute(self, key: str, meta: dict, cmd: list[str]) -> bool:
        """Run one row's process; False when the budget ran out (the row is left for --resume)."""
        if not self.fits(key):
            return False
        row_file = self.work / (key.replace("/", "_") + ".json")
        row_file.unlink(missing_ok=True)
        start = time.perf_counter()
        rc, err = launch(cmd, self.remaining())
        if rc == -9 and not row_file.exists():
            print(f"{key}: cut by the budget after {time.perf_counter() - start:.0f} s; --resume runs it again",
                  flush=True)
            return False
        try:
            row = {**meta, **json.loads(row_file.read_text())}
        except (OSError, ValueError):
            lines = [ln for ln in err.strip().splitlines() if "Error" in ln or "error" in ln] or \
                err.strip().splitlines() or [f"exit {rc}"]
            row = {**meta, "error": lines[-1][:300]}
        row["wall_s"] = time.perf_counter() - start
        self.add(row)
        return True

    # ---- rows --------------------------------------------------------------------------------

    def dp_rows(self, shape: str) -> bool:
        a = self.args
        folder = None
        for run in a.runs.split(","):
            blocker = not_data_parallel(run)
            for gpus in a.gpu_counts:
                key = f"dp/{shape}/{run}/{gpus}gpu"
                if self.done(key):
                    continue
                meta = {"key": key, "kind": "dp", "tool": "llmc", "shape": shape, "run": run, "gpus": gpus}
                if blocker:
                    self.add({**meta, "skipped": f"{blocker} does not declare data_parallel = True; skipped"})
                    continue
                if a.device == "cuda" and gpus > torch.cuda.device_count():
                    self.add({**meta, "error": f"needs {gpus} GPUs, this machine has {torch.cuda.device_count()}"})
                    continue
                if not self.fits(key):
                    return False
                folder = folder or build_model(shape, a.layers, self.root)
                weights = self.work / f"weights_{shape}_{run}_{gpus}gpu.pt"
                driver = [str(HERE / "scale_driver.py"), "--model", str(folder), "--bench-run", run,
                          "--device", a.device, "--out", str(self.work / (key.replace("/", "_") + ".json")), "--weights", str(weights),
                          *self.common()]
                cmd = [sys.executable, *driver] if gpus == 1 else [*torchrun(gpus), *driver]
                if not self.execute(key, meta, cmd):
                    return False
                ref = self.work / f"weights_{shape}_{run}_1gpu.pt"
                row = self.data["rows"][-1]
                if gpus > 1 and "error" not in row and ref.exists() and weights.exists():
                    row["agreement"] = agreement(ref, weights)
                    save(self.out, self.data)
        return True

    def peer_rows(self, shape: str) -> bool:
        a = self.args
        for run in [r for r in a.peer.split(",") if r]:
            for gpus in a.peer_gpu_counts:
                key = f"peer/{shape}/{run}/{gpus}gpu"
                if self.done(key):
                    continue
                if not self.fits(key):
                    return False
                folder = build_model(shape, a.layers, self.root)
                meta = {"key": key, "kind": "peer", "tool": "llm-compressor", "shape": shape, "run": run,
                        "gpus": gpus}
                row_file = str(self.work / (key.replace("/", "_") + ".json"))
                if gpus == 1:  # its ordinary oneshot (as speed.py's peer rows); prints its JSON line
                    cmd = ["bash", "-c", f'"$0" "$@" | tail -n 1 > {row_file}', a.peer_python,
                           str(HERE / "peer_speed.py"), "--model", str(folder), "--run", run,
                           "--n-samples", str(a.n_samples), "--seq-len", str(a.seq_len)]
                else:
                    cmd = [a.peer_python, *torchrun(gpus)[1:], str(HERE / "peer_scale.py"), "--model", str(folder),
                           "--bench-run", run, "--out", row_file, "--n-samples", str(a.n_samples),
                           "--seq-len", str(a.seq_len), "--offload-dir", str(self.work / "peer_offload")]
                if not self.execute(key, meta, cmd):
                    return False
        return True

    def host_row(self, kind: str, layers: int, stream: bool, gpus: int = 1) -> bool:
        a = self.args
        shape, run = a.host_shape, a.host_run
        key = f"{kind}/{shape}/{layers}l/{run}/{'stream' if stream else 'memory'}" + (f"/{gpus}gpu" if gpus > 1 else "")
        if self.done(key):
            return True
        meta = {"key": key, "kind": kind, "tool": "llmc", "shape": shape, "run": run, "gpus": gpus, "stream": stream,
                "full_layers": SHAPES[shape]["num_hidden_layers"]}
        if a.device == "cuda" and gpus > torch.cuda.device_count():
            self.add({**meta, "layers": layers, "error": f"needs {gpus} GPUs, this machine has "
                                                         f"{torch.cuda.device_count()}"})
            return True
        dims = SHAPES[shape]
        short = self.disk_shortfall(shape, dims, layers)
        if short:
            self.add({**meta, "layers": layers, "error": short})
            return True
        if self.remaining() < a.min_row_s:
            return self.fits(key)
        try:
            folder, build = checkpoint(shape, dims, layers, self.root,
                                       self.deadline - a.min_row_s if self.deadline else None)
        except OutOfTime as exc:
            print(f"{key}: model build {exc}; --resume goes on with it", flush=True)
            return False
        if build["build_s"] > 1:
            meta["build"] = build
        if stream:
            meta["cache_dropped"] = drop_page_cache(folder)
        driver = [str(HERE / "scale_driver.py"), "--model", str(folder), "--bench-run", run,
                  "--device", a.device, "--out", str(self.work / (key.replace("/", "_") + ".json")), *self.common()]
        cmd = [sys.executable, *driver] if gpus == 1 else [*torchrun(gpus), *driver]
        return self.execute(key, meta, cmd + (["--stream"] if stream else []))

    def disk_shortfall(self, shape: str, dims: dict, layers: int) -> str | None:
        """Why `layers` layers do not fit on the disk (None: they do, 2 GiB spare)."""
        rest, layer = tensor_shapes(dims)
        per_layer = 2 * sum(s.numel() for s in layer.values())
        store = self.root / f"{shape}-shards"
        have = len(list(store.glob("layer-*.safetensors"))) if store.exists() else 0
        rest_bytes = 0 if have else 2 * sum(s.numel() for s in rest.values())
        need = per_layer * max(0, layers - have) + rest_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if need + 2 * 2**30 <= free:
            return None
        fits = have + max(0, (free - 2 * 2**30 - rest_bytes) // per_layer)
        return (f"{layers} layers need {need / 2**30:.1f} GiB more and {free / 2**30:.1f} GiB are free; "
                f"use --disk-layers {fits} or less")

    def main(self) -> None:
        a = self.args
        kinds = a.rows.split(",")
        for shape in a.shapes.split(","):
            if "dp" in kinds and not self.dp_rows(shape):
                return
            if "peer" in kinds and not self.peer_rows(shape):
                return
        if "host" in kinds:
            for layers in a.host_layer_counts:
                for stream in (False, True):
                    if not self.host_row("host", layers, stream):
                        return
        if "disk" in kinds and a.disk_layers and not self.host_row("disk", a.disk_layers, True):
            return
        for gpus in a.gpu_counts if "diskdp" in kinds and a.disk_layers else []:  # the disk row data-parallel
            if gpus > 1 and not self.host_row("disk", a.disk_layers, True, gpus):
                return
        print(f"all rows done: {self.out.with_suffix('.md')}", flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="dev", help="results go to benchmarks/results/scale_<tag>.json/.md")
    parser.add_argument("--out", default="", help="instead of benchmarks/results/scale_<tag>")
    parser.add_argument("--rows", default="dp,peer", help="any of dp,peer,host,disk,diskdp (in this order; diskdp: "
                        "the disk row under torchrun on each --gpus count above 1)")
    parser.add_argument("--shapes", default="llama2-7b,llama3-8b", help="dp and peer rows' shapes")
    parser.add_argument("--layers", type=int, default=None, help="truncate the dp/peer shapes (tests, trials)")
    parser.add_argument("--gpus", default="1,2", help="dp rows: process counts (1 = plain, N = torchrun)")
    parser.add_argument("--runs", default="gptq,rtn,awq", help="dp rows: speed.py runs (skipped unless data-parallel)")
    parser.add_argument("--peer", default="gptq", help="peer rows: llm-compressor runs")
    parser.add_argument("--peer-gpus", default="2", help="peer rows: process counts (1 = plain oneshot)")
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--host-shape", default="llama2-70b")
    parser.add_argument("--host-layers", default="2,4", help="host rows: truncated layer counts")
    parser.add_argument("--host-run", default="gptq", help="host and disk rows' run")
    parser.add_argument("--disk-layers", type=int, default=24, help="disk row: streamed layers (~1.6 GiB each)")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resume", action="store_true", help="keep the finished rows of <out>.json, run the rest")
    parser.add_argument("--budget-s", type=float, default=0, help="stop starting/running rows after this long")
    parser.add_argument("--min-row-s", type=float, default=30, help="start no row with less budget left")
    parser.add_argument("--no-guess", dest="guess", action="store_false",
                        help="start a row whenever --min-row-s is left (default: also when its guessed time is)")
    parser.add_argument("--model-root", default="/tmp/llmc-speed-models")
    parser.add_argument("--work", default="/tmp/llmc-scale-work", help="row files and probe weights")
    args = parser.parse_args()
    args.gpu_counts, args.peer_gpu_counts, args.host_layer_counts = ints(args.gpus), ints(args.peer_gpus), \
        ints(args.host_layers)
    Bench(args).main()


if __name__ == "__main__":
    main()
