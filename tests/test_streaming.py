"""Disk-streamed models (`model.stream: true`, llmc.pipeline.streaming): the outputs equal an
in-memory run's byte for byte, host memory stays near one block, and what cannot stream is refused."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from llmc import compress
from llmc.errors import ConfigError
from llmc.pipeline.planner import GIB, MemoryPlan, plan_memory

pytestmark = pytest.mark.usefixtures("one_thread")

W4 = {"bit": 4, "group_size": 32, "symmetric": False, "granularity": "per_group"}


def save_llama(folder: Path, tokenizer, *, layers: int, hidden: int, inter: int, heads: int, kv: int,
               tied: bool = False, widen: bool = True) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=256, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if widen:  # visible quantization error, logits not flat
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(glob.glob(str(folder / "*.safetensors"))):
        out.update(load_file(file))
    return out


def run_config(model_dir: Path, out: Path, method: str, stream: bool) -> dict:
    cfg = tiny_config(model_dir, quant={"method": method, "weight": W4},
                      save={"save_path": str(out), "save_fake": True, "save_trans": True, "save_vllm": True})
    cfg["model"].update(torch_dtype="bfloat16", stream=stream)
    cfg["eval"].update(eval_pos=["pretrain", "transformed", "fake_quant"], max_windows=2, seq_len=64)
    return cfg


@pytest.mark.parametrize("method,tied", [("RTN", False), ("GPTQ", True)])
def test_streamed_outputs_equal_the_in_memory_run_byte_for_byte(tmp_path, tiny_tokenizer, method, tied):
    model_dir = save_llama(tmp_path / "model", tiny_tokenizer, layers=3, hidden=64, inter=128, heads=4, kv=2,
                           tied=tied)
    memory = compress(run_config(model_dir, tmp_path / "memory", method, stream=False), progress=False)
    streamed = compress(run_config(model_dir, tmp_path / "streamed", method, stream=True), progress=False)
    for sub in ("fake_quant_model", "transformed_model", "vllm_quant_model"):
        a, b = tensors(tmp_path / "memory" / sub), tensors(tmp_path / "streamed" / sub)
        assert set(a) == set(b) and len(a) == 3 * (9 if sub != "vllm_quant_model" else 2 + 7 * 4) + 2 + (not tied)
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert a[key].view(torch.uint8).equal(b[key].view(torch.uint8)), key
        index = json.loads((tmp_path / "streamed" / sub / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) == 4
        config_a, config_b = (json.loads((tmp_path / run / sub / "config.json").read_text())
                              for run in ("memory", "streamed"))
        assert config_a == config_b
    assert not torch.equal(tensors(tmp_path / "streamed" / "fake_quant_model")["model.layers.1.mlp.up_proj.weight"],
                           tensors(model_dir)["model.layers.1.mlp.up_proj.weight"])
    # perplexity streams from the checkpoint (pretrain) and from the blocks just written
    assert [r.position for r in streamed.perplexity] == [r.position for r in memory.perplexity]
    assert [r.ppl for r in streamed.perplexity] == pytest.approx([r.ppl for r in memory.perplexity], rel=1e-4)
    assert not list(tmp_path.glob(".streamed.tmp-*"))  # the staging folder was moved into the output
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed" / "fake_quant_model")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    # nothing of a finished block stays in host memory, its fake-quant linears' scales included (they
    # grew a 70B-shaped run by 0.05 GiB per block)
    kept = [name for name, t in [*streamed.model.model.layers.named_parameters(),
                                 *streamed.model.model.layers.named_buffers()] if not t.is_meta]
    assert kept == []


PROBE = r"""
import json, logging, re, sys
import torch
import transformers.models.llama.modeling_llama
from llmc import compress
from llmc.pipeline.planner import current_rss
torch.set_num_threads(1)
plans = []
class Grab(logging.Handler):
    def emit(self, record):
        m = re.search(r"peak host ([\d.]+) GiB", record.getMessage())
        if m:
            plans.append(float(m.group(1)) * 2**30)
logging.getLogger("llmc").addHandler(Grab())
logging.getLogger("llmc").setLevel(logging.INFO)
base = current_rss()
compress(json.loads(sys.argv[1]), progress=False)
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork (kept across exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"base": base, "peak": hwm * 1024, "plan": plans[0]}))
"""


def peak_rss(cfg: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cfg)], capture_output=True, text=True, timeout=240,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_streamed_host_memory_stays_near_one_block(tmp_path, tiny_tokenizer):
    """28 blocks of 6.8 MB (bf16, 191 MB in all): the streamed run's peak RSS grows by about ten blocks
    (a block's quantization working set on CPU), the in-memory run's by several times the model; each
    plan's host figure is within 30% of the measured peak."""
    model_dir = save_llama(tmp_path / "wide", tiny_tokenizer, layers=28, hidden=512, inter=1536, heads=8, kv=8,
                           widen=False)
    model_bytes = sum(t.numel() * t.element_size() for t in tensors(model_dir).values())
    assert 180e6 < model_bytes < 200e6
    peaks = {}
    for stream in (False, True):
        cfg = {"base": {"seed": 0, "device": "cpu"},
               "model": {"path": str(model_dir), "torch_dtype": "bfloat16", "stream": stream},
               "quant": {"method": "RTN", "weight": {"bit": 4, "group_size": 128}},
               "save": {"save_path": str(tmp_path / f"out-{stream}"), "save_fake": True}}
        peaks[stream] = peak_rss(cfg)
    grow = {s: p["peak"] - p["base"] for s, p in peaks.items()}
    print({s: (round(p["base"] / 2**20), round(p["peak"] / 2**20), round(p["plan"] / 2**20)) for s, p in peaks.items()},
          round(model_bytes / 2**20))
    assert grow[False] > model_bytes
    assert grow[True] < 0.5 * model_bytes
    for p in peaks.values():
        assert p["plan"] == pytest.approx(p["peak"], rel=0.3)


def test_cpu_plan_counts_the_activation_cache_transients_and_saving_as_host_memory():
    plan = MemoryPlan(block_bytes=GIB, cache_bytes=8 * GIB, transient_bytes=GIB, method_bytes=2 * GIB,
                      cache_on_device=True, device_total=None, host_model_bytes=20 * GIB, host_runtime_bytes=GIB,
                      device_is_host=True)
    assert plan.peak_host == GIB + 20 * GIB + 8 * GIB + GIB + 2 * GIB  # the device is the host
    plan.save_bytes = 40 * GIB  # writing the outputs afterwards needs more than the loop
    assert plan.peak_host == 61 * GIB
    plan.eval_bytes = 50 * GIB  # and a perplexity batch's logits more still
    assert plan.peak_host == 71 * GIB


def test_cpu_plan_counts_an_evaluation_batchs_logits():
    from conftest import build_tiny_model

    from llmc.models import get_adapter

    model = build_tiny_model("llama", 384)
    blocks = get_adapter("auto", "llama").get_blocks(model)
    cpu = plan_memory(model, blocks, 0, 0, 0, torch.device("cpu"), eval_tokens=2 * 128)
    assert cpu.eval_bytes == 2 * (2 * 128) * 384 * 4  # float32 logits and their log-softmax
    assert cpu.peak_host == cpu.host_model_bytes + cpu.eval_bytes and "evaluating" in cpu.describe()


def test_streamed_plan_holds_the_non_block_tensors_and_two_blocks(tmp_path, tiny_tokenizer):
    from llmc.config.schema import ModelSection
    from llmc.models import load_model

    model_dir = save_llama(tmp_path / "model", tiny_tokenizer, layers=3, hidden=64, inter=128, heads=4, kv=2)
    loaded = load_model(ModelSection(path=str(model_dir), torch_dtype="bfloat16", stream=True))
    blocks = loaded.adapter.get_blocks(loaded.model)
    assert all(p.is_meta for p in blocks.parameters())
    outside = sum(t.numel() * t.element_size() for k, t in loaded.model.state_dict().items() if ".layers." not in k)
    block = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    rotary = sum(b.numel() * b.element_size() for b in loaded.model.buffers())  # float32, computed at load
    plan = plan_memory(loaded.model, blocks, 0, 0, 0, torch.device("cpu"), save_fake=True)
    assert plan.streamed and plan.host_model_bytes == outside + rotary + 2 * block
    linears = sum(m.weight.numel() * 2 for m in blocks[0].modules() if isinstance(m, torch.nn.Linear))
    assert plan.save_bytes == max(block + linears, outside + rotary)


@pytest.mark.parametrize("change,message", [
    ({"model": {"gguf_file": "tiny.gguf"}}, r"not GGUF .*convert the checkpoint to safetensors or drop model.stream"),
    ({"model": {"path": "someorg/some-model"}}, r"is a hub id; download the checkpoint"),
    ({"save": {"save_autoawq": True}}, r"save.save_autoawq is not written from a streamed model"),
    ({"save": {"save_vllm": True}, "quant": {"kvcache": {"method": "Naive", "bit": 8}}},
     r"save.save_vllm of a streamed model takes quantized weights only"),
    ({"quant": {"method": ["QuaRot", "GPTQ"]}}, r"QuaRot changes the whole model .*drop model.stream"),
    ({"eval": {"eval_pos": ["fake_quant"]}}, r"eval at fake_quant reads the blocks written by save.save_fake"),
])
def test_what_cannot_stream_is_refused_before_loading(tmp_path, tiny_llama_dir, change, message):
    cfg = tiny_config(tiny_llama_dir, quant={"method": "RTN", "weight": W4})
    cfg["model"]["stream"] = True
    cfg["eval"] = None
    for section, values in change.items():
        cfg[section] = {**(cfg.get(section) or {}), **values}
    if "save" in change:
        cfg["save"]["save_path"] = str(tmp_path / "out")
    with pytest.raises(ConfigError, match=message):
        compress(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_pickled_checkpoint_is_refused(tmp_path, tiny_tokenizer):
    folder = save_llama(tmp_path / "bin", tiny_tokenizer, layers=1, hidden=64, inter=128, heads=4, kv=2)
    torch.save(tensors(folder), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    cfg = tiny_config(tmp_path / "bin", quant={"method": "RTN", "weight": W4})
    cfg["model"].update(stream=True, allow_pickle=True)
    cfg["eval"] = None
    with pytest.raises(ConfigError, match=r"holds none; convert the checkpoint to safetensors or drop model.stream"):
        compress(cfg, progress=False)


def test_a_failed_streamed_run_leaves_no_output_and_no_staging_folder(tmp_path, tiny_llama_dir, monkeypatch):
    import gc

    from llmc.pipeline import stream_output

    written = []

    def fail_at_block_1(self, index, block):
        if index == 1:
            raise RuntimeError("disk full")
        written.append(index)
        original(self, index, block)

    original = stream_output.StreamWriter.write_block
    monkeypatch.setattr(stream_output.StreamWriter, "write_block", fail_at_block_1)
    cfg = tiny_config(tiny_llama_dir, quant={"method": "RTN", "weight": W4},
                      save={"save_path": str(tmp_path / "out"), "save_fake": True})
    cfg["model"]["stream"] = True
    cfg["eval"] = None
    with pytest.raises(RuntimeError, match="disk full"):
        compress(cfg, progress=False)
    gc.collect()
    assert written == [0] and list(tmp_path.iterdir()) == []
