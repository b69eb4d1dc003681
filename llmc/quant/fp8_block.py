"""Block-wise FP8 (e4m3) fake quantization, with the interface of `IntQuantizer`.

DeepSeek-V3's FP8 layout (DeepSeek-AI, 2024, "DeepSeek-V3 Technical Report", arXiv:2412.19437,
section 3.3.2): weights have one scale per block of `block_size x block_size` (128 x 128) and
activations one scale per token and group of `group_size` (128) consecutive features, computed
from each input (dynamic). The scale is `absmax / 448`, as for per-channel FP8; a weight whose
dimensions are not multiples of the block is padded with zeros, as compressed-tensors does
(`granularity: per_block`, llmc's spelling; compressed-tensors' FP8_BLOCK scheme).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llmc.quant.fp8 import FP8_DTYPE, FP8_E4M3_MAX, e4m3_params
from llmc.quant.microscaling import group_rows, round_element_ste, ungroup_rows
from llmc.quant.quantizer import QuantizerCommon


@dataclass(frozen=True)
class FP8BlockQuantizer(QuantizerCommon):
    granularity: str
    """per_block (2-D weights) or per_group (activations: groups of features of one token)."""
    block_size: int = 128
    group_size: int = 128
    calib_algo: str = "minmax"
    bit: str = "e4m3"
    symmetric: bool = True
    partial_group: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    percentile: float = 99.9
    scale_dtype: torch.dtype | None = None
    """fp16/bf16: scales are rounded to this dtype (see IntQuantizer.scale_dtype)."""

    def __post_init__(self) -> None:
        if self.granularity not in ("per_block", "per_group"):
            raise ValueError(f"FP8 blocks are per_block (weights) or per_group (activations), not {self.granularity!r}")
        if self.block_size < 1 or self.group_size < 1:
            raise ValueError("block_size and group_size must be >= 1")
        self.check_calib_algo()

    @property
    def qmin(self) -> float:
        return -FP8_E4M3_MAX

    @property
    def qmax(self) -> float:
        return FP8_E4M3_MAX

    def blocks(self, shape: torch.Size) -> tuple[int, int]:
        """Blocks along the rows and the columns of a weight of `shape`."""
        b = self.block_size
        return -(-shape[0] // b), -(-shape[1] // b)

    def rows(self, x: Tensor) -> Tensor:
        """per_block: one row per block (row-major over the blocks), `[blocks, block_size ** 2]`."""
        if self.granularity == "per_group":
            return group_rows(x, self.group_size, True, "FP8")
        b = self.block_size
        nr, nc = self.blocks(x.shape)
        x = F.pad(x, (0, nc * b - x.shape[1], 0, nr * b - x.shape[0]))
        return x.reshape(nr, b, nc, b).transpose(1, 2).reshape(nr * nc, b * b)

    def unrows(self, rows: Tensor, shape: torch.Size) -> Tensor:
        if self.granularity == "per_group":
            return ungroup_rows(rows, shape, self.group_size)
        b = self.block_size
        nr, nc = self.blocks(shape)
        return rows.reshape(nr, nc, b, b).transpose(1, 2).reshape(nr * b, nc * b)[: shape[0], : shape[1]]

    def params_from_range(self, xmin: Tensor, xmax: Tensor) -> tuple[Tensor, Tensor]:
        return e4m3_params(xmin, xmax, self.scale_dtype)

    def _qdq_rows(self, rows: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        return round_element_ste((rows / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX), "e4m3") * scale

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        """The e4m3 values (`torch.float8_e4m3fn`) of `x / scale`, same shape as `x`."""
        rows = self.rows(x).float()
        return self.unrows((rows / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE), x.shape)

    def quant_dequant(self, x: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        out = self._qdq_rows(self.rows(x).float(), scale.float())
        return self.unrows(out, x.shape).to(x.dtype)
