"""Shared fixtures: tiny random Llama (grouped-query attention) and OPT models, saved as HF
folders with a small byte-level BPE tokenizer, and the real SmolLM2-135M when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmc.data import bundled_path, read_documents  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained in-process on WikiText-2 validation paragraphs (no files needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = read_documents(bundled_path("wikitext2", "calib"))[:400]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>"],
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_model(kind: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    elif kind == "opt":
        config = OPTConfig(
            vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2,
        )
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is tiny; widen it so quantization error is visible and logits are not flat.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


def _save_tiny(kind: str, root: Path, tokenizer) -> Path:
    folder = root / f"tiny-{kind}"
    model = build_tiny_model(kind, len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return _save_tiny("llama", tmp_path_factory.mktemp("models"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return _save_tiny("opt", tmp_path_factory.mktemp("models"), tiny_tokenizer)


@pytest.fixture(params=["llama", "opt"])
def tiny_model_dir(request, tiny_llama_dir, tiny_opt_dir) -> Path:
    return {"llama": tiny_llama_dir, "opt": tiny_opt_dir}[request.param]


def tiny_config(model_dir: Path, **sections) -> dict:
    """A config dict for a tiny model: quick eval on the bundled WikiText-2, few calibration samples."""
    cfg = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "auto", "path": str(model_dir), "torch_dtype": "float32"},
        "calib": {"name": "wikitext2", "n_samples": 4, "seq_len": 64, "bs": 2},
        "eval": {"eval_pos": ["pretrain", "fake_quant"], "name": "wikitext2", "seq_len": 128, "max_windows": 4},
    }
    for key, value in sections.items():
        cfg[key] = value
    return cfg


def real_model_dir() -> Path | None:
    from llmc.fetch import default_cache_dir

    folder = Path(default_cache_dir()) / "models" / "smollm2-135m-instruct"
    return folder if (folder / GGUF_NAME).is_file() else None


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    folder = real_model_dir()
    if folder is None:
        if os.environ.get("LLMC_REQUIRE_REAL_MODEL") == "1":
            pytest.fail("the quickstart model is missing; run `make setup` (llmc fetch) first")
        pytest.skip("real SmolLM2-135M not fetched (run `make setup`)")
    return folder


@pytest.fixture(scope="session")
def _real_loaded_once(real_model_path):
    from llmc.config.schema import ModelSection
    from llmc.models import load_model

    return load_model(ModelSection(type="SmolLM", path=str(real_model_path), gguf_file=GGUF_NAME,
                                   torch_dtype="float32"))


@pytest.fixture
def real_loaded(_real_loaded_once):
    """The GGUF-loaded SmolLM2-135M, a private copy per test: loading (GGUF tokenizer and weight
    conversion) costs ~20 s on CI's 2 cores, so each worker loads it once."""
    import copy
    import dataclasses

    return dataclasses.replace(_real_loaded_once, model=copy.deepcopy(_real_loaded_once.model))


@pytest.fixture(autouse=True)
def _threads_for_size(request):
    """Tiny models run fastest on one thread (several crawl on a busy machine); the real model uses
    this worker's share of the cores (pytest-xdist: cores // workers). More threads than that spin-wait
    against the other worker: on 2 busy cores SmoothQuant's real-model check took 22 s on 2 threads, 2.6 s on 1."""
    if request.node.get_closest_marker("real_model"):
        threads = torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        torch.set_num_threads(max(1, min(threads, share)))
        yield
        torch.set_num_threads(threads)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Small tensors: one thread is faster, and far faster on a loaded machine (no spin-waiting).
    Test files use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
