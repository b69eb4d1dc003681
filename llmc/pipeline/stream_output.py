"""Outputs of a disk-streamed run (`model.stream`, llmc.pipeline.streaming), written block by block.

Each finished block goes at once into every output folder as one safetensors shard
(`model-000NN-of-000MM.safetensors`: block NN-1; the last shard holds the non-block tensors), with
`model.safetensors.index.json`, config and tokenizer written at the end: save_trans, save_fake and
the compressed-tensors checkpoints (save_vllm, save_sgl). The folders are staged beside save_path
and moved into the atomic output folder (llmc.save) with results.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor, nn

from llmc.pipeline.streaming import block_store

log = logging.getLogger("llmc")

STREAMED_EXPORTS = ("save_vllm", "save_sgl")
"""Packed exports written block by block (compressed-tensors); the others are refused with model.stream."""


class StreamWriter:
    """A transformers folder written block by block: shard `i + 1` of `n + 1` holds block i, the last
    one the non-block tensors; `finish` adds it, the index, config and tokenizer files."""

    def __init__(self, folder: Path, blocks_path: str, n_blocks: int, fake: bool) -> None:
        self.folder, self.blocks_path, self.n, self.fake = folder, blocks_path, n_blocks, fake
        self.what = "fake-quantized" if fake else "transformed"
        self.weight_map: dict[str, str] = {}
        self.total = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _shard(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.n + 1:05d}.safetensors"

    def _write(self, state: dict[str, Tensor], shard: str) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(state, str(self.folder / shard), metadata={"format": "pt"})
        for key, t in state.items():
            self.weight_map[key] = shard
            self.total += t.numel() * t.element_size()

    def block_tensors(self, block: nn.Module) -> dict[str, Tensor]:
        from llmc.save import model_state_dict

        return model_state_dict(block, self.fake)

    def write_block(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.blocks_path}.{index}."
        self._write({prefix + k: v for k, v in self.block_tensors(block).items()}, self._shard(index))

    def write_config(self, model: nn.Module) -> None:
        model.config.save_pretrained(self.folder)

    def finish(self, model: nn.Module, tokenizer: object) -> None:
        from llmc.save import save_tokenizer_files

        blocks = self.blocks_path + "."
        tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if getattr(
            model.config, "tie_word_embeddings", False) else set()
        head = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks) and k not in tied}
        missing = [k for k in range(self.n) if self._shard(k) not in set(self.weight_map.values())]
        if missing:
            raise RuntimeError(f"internal error: block {missing[0]} was never written to {self.folder}")
        self._write(head, self._shard(self.n))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        self.write_config(model)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(self.folder)
        save_tokenizer_files(model, tokenizer, self.folder)
        log.info("wrote %s model to %s (streamed, %d shards)", self.what, self.folder, self.n + 1)


class CompressedTensorsWriter(StreamWriter):
    """save_vllm / save_sgl: each block's fake-quant linears compressed as `llmc.export.compressed_tensors`
    does for the whole model; config.json gets its quantization_config at the end."""

    def __init__(self, folder: Path, blocks_path: str, n_blocks: int, cfg, model: nn.Module) -> None:
        from llmc.export.compressed_tensors import model_dtype

        super().__init__(folder, blocks_path, n_blocks, fake=False)
        self.cfg, self.dtype, self.what = cfg, model_dtype(model), "compressed-tensors"

    def block_tensors(self, block: nn.Module) -> dict[str, Tensor]:
        from llmc.export.compressed_tensors import compressed_tensors_of

        return compressed_tensors_of(block, self.cfg, self.dtype)

    def write_config(self, model: nn.Module) -> None:
        from compressed_tensors.compressors import ModelCompressor

        from llmc.export.compressed_tensors import ignore_list, quantization_config

        model.config.save_pretrained(self.folder)
        # the blocks' modules are still there (on the meta device), so the float linears are named as in memory
        ModelCompressor(quantization_config=quantization_config(self.cfg, ignore_list(model, self.cfg)),
                        transform_config=None).update_config(str(self.folder))


class StreamedOutputs:
    """The outputs of a streamed run, written block by block into a staging folder beside save_path
    (named as this process's temporary folders: a killed run's is removed at the next start, a failed
    one's when this object goes), moved into the atomic output folder at the end."""

    def __init__(self, cfg, model: nn.Module, out_path: Path, blocks_path: str) -> None:
        from llmc.export import requested_exporters
        from llmc.save import FAKE_DIR, TRANS_DIR, _work_name

        out_path.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=_work_name(out_path, "tmp"), dir=out_path.parent))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        n = len(model.get_submodule(blocks_path))
        self.writers = {name: StreamWriter(self.folder / name, blocks_path, n, fake=name == FAKE_DIR)
                        for name, on in ((TRANS_DIR, cfg.save.save_trans), (FAKE_DIR, cfg.save.save_fake)) if on}
        for exporter in requested_exporters(cfg):  # only STREAMED_EXPORTS pass check_stream_config
            self.writers[exporter.folder] = CompressedTensorsWriter(self.folder / exporter.folder, blocks_path, n,
                                                                    cfg, model)
        self.dirs = position_dirs()

    @classmethod
    def reader(cls, folder: Path) -> StreamedOutputs:
        """Another data-parallel rank's view of rank 0's staging `folder`: it only evaluates from it
        (no writers; the folder is rank 0's to move or remove)."""
        outputs = cls.__new__(cls)
        outputs.folder, outputs.writers, outputs.dirs = folder, {}, position_dirs()
        return outputs

    def write_block(self, index: int, block: nn.Module) -> None:
        from llmc.finite import check_model_weights

        if self.writers:
            check_model_weights(block)  # no NaN/Inf weight is ever saved
        for writer in self.writers.values():
            writer.write_block(index, block)

    def finish(self, model: nn.Module, tokenizer: object) -> None:
        for writer in self.writers.values():
            writer.finish(model, tokenizer)

    def move_into(self, tmp: Path) -> None:
        for name in self.writers:
            os.rename(self.folder / name, tmp / name)
        self._cleanup()

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module, position: str) -> Iterator[None]:
        """Evaluation at `position` of a streamed model: pretrain reads the checkpoint's blocks, transformed
        and fake_quant the blocks this run wrote (fake-quantized values, so quantization stays off)."""
        store = block_store(model)
        if position == "pretrain":
            yield
            return
        from llmc.quant import quant_disabled

        source = store.folder
        store.open(self.folder / self.dirs[position])
        try:
            with quant_disabled(model):
                yield
        finally:
            store.open(source)


def position_dirs() -> dict[str, str]:
    """The output folder each evaluation position reads its blocks from."""
    from llmc.save import FAKE_DIR, TRANS_DIR

    return {"transformed": TRANS_DIR, "fake_quant": FAKE_DIR}


def streamed_outputs(cfg, model: nn.Module, out_path: Path | None) -> StreamedOutputs | None:
    """The streamed run's outputs, wired to the block loop (None: the model is in memory)."""
    store = block_store(model)
    if store is None or out_path is None:
        return None
    outputs = StreamedOutputs(cfg, model, out_path, store.blocks_path)
    store.sink = outputs.write_block
    return outputs
