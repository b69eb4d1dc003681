"""Bit packing of integer codes into int32 words, as AutoAWQ and GPTQ checkpoints store them.

GPTQ (AutoGPTQ / GPTQModel `PackableQuantLinear.pack`, vLLM's `gptq` kernels) packs `32 / bits`
codes per int32 word, code j of a word in bits `[bits*j, bits*(j+1))`. 3-bit codes do not fit a
word evenly: 32 codes fill three words as one little-endian 96-bit stream (code j at stream bit
3j, codes 10 and 21 straddle two words), which is what GPTQModel's `_pack_rows_3` and the
`bits == 3` branch of its `dequantize_weight` implement. `pack_cols` writes exactly that stream
for every width, so 2, 3, 4 and 8 bits share one code path.

AutoAWQ's GEMM layout (`awq/modules/linear/gemm.py`, `WQLinear_GEMM.from_linear`) packs 8
4-bit codes per word along the output dimension in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7]
(`AWQ_ORDER` in `awq/utils/packing_utils.py`): nibble i of word c holds column `8c + order[i]`.
"""

from __future__ import annotations

import torch
from torch import Tensor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
WORD_BITS = 32


def values_per_block(bits: int) -> int:
    """How many codes one packing unit holds: 32 codes in `bits` words (32/bits per word for 2, 4, 8)."""
    return WORD_BITS if WORD_BITS % bits else WORD_BITS // bits


def pack_cols(codes: Tensor, bits: int) -> Tensor:
    """Pack `[rows, cols]` codes in `[0, 2^bits)` along dim 1 into int32 `[rows, cols * bits / 32]`."""
    rows, cols = codes.shape
    unit = values_per_block(bits)
    if cols % unit:
        raise ValueError(f"{cols} columns are not a multiple of {unit}, needed to pack {bits}-bit codes")
    q = codes.to(torch.int64)
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits - 1}] cannot be packed in {bits} bits")
    words_per_unit = unit * bits // WORD_BITS
    q = q.reshape(rows, cols // unit, unit)
    out = torch.zeros(rows, cols // unit, words_per_unit, dtype=torch.int64)
    for j in range(unit):
        start = bits * j  # position of code j in the unit's little-endian bit stream
        for w in range(start // WORD_BITS, (start + bits - 1) // WORD_BITS + 1):
            offset = start - WORD_BITS * w
            part = q[:, :, j] << offset if offset >= 0 else q[:, :, j] >> -offset
            out[:, :, w] |= part & 0xFFFFFFFF
    out = out.reshape(rows, -1)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack `[rows, cols]` codes along dim 0 into int32 `[rows * bits / 32, cols]` (GPTQ qweight)."""
    return pack_cols(codes.T, bits).T.contiguous()


def pack_awq(codes: Tensor) -> Tensor:
    """Pack 4-bit `[rows, cols]` codes along dim 1 in AWQ's interleaved order: int32 `[rows, cols / 8]`."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"{cols} columns are not a multiple of 8, needed by AutoAWQ's packing")
    order = torch.tensor(AWQ_ORDER)
    interleaved = codes.reshape(rows, cols // 8, 8)[:, :, order].reshape(rows, cols)
    return pack_cols(interleaved, 4)
