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


def _word_fields(bits: int) -> list[list[tuple[int, int]]]:
    """Per word of a packing unit, the (code index, bit offset) pairs landing in it; a negative
    offset is a code's upper bits continuing from the previous word."""
    unit = values_per_block(bits)
    words: list[list[tuple[int, int]]] = [[] for _ in range(unit * bits // WORD_BITS)]
    for j in range(unit):
        start = bits * j  # position of code j in the unit's little-endian bit stream
        for w in range(start // WORD_BITS, (start + bits - 1) // WORD_BITS + 1):
            words[w].append((j, start - WORD_BITS * w))
    return words


def pack_cols(codes: Tensor, bits: int) -> Tensor:
    """Pack `[rows, cols]` codes in `[0, 2^bits)` along dim 1 into int32 `[rows, cols * bits / 32]`."""
    rows, cols = codes.shape
    unit = values_per_block(bits)
    if cols % unit:
        raise ValueError(f"{cols} columns are not a multiple of {unit}, needed to pack {bits}-bit codes")
    q = codes
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits - 1}] cannot be packed in {bits} bits")
    if WORD_BITS % bits == 0:
        # One word per unit: fields never straddle words, and disjoint fields add without carries
        # (the int32 sum wraps into the sign bit exactly as the packed word reads).
        shifts = torch.arange(unit, dtype=torch.int32) * bits
        return (q.to(torch.int32).reshape(rows, cols // unit, unit) << shifts).sum(dim=-1, dtype=torch.int32)
    q = q.to(torch.int64).reshape(rows, cols // unit, unit)
    words = []
    for fields in _word_fields(bits):
        idx = torch.tensor([j for j, _ in fields])
        offsets = torch.tensor([o for _, o in fields])
        part = q[:, :, idx]
        # Fields of one word are disjoint bit ranges, so their sum is their bitwise or.
        shifted = torch.where(offsets >= 0, part << offsets.clamp(min=0), part >> (-offsets).clamp(min=0))
        words.append((shifted & 0xFFFFFFFF).sum(dim=-1))
    out = torch.stack(words, dim=-1).reshape(rows, -1)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack `[rows, cols]` codes along dim 0 into int32 `[rows * bits / 32, cols]` (GPTQ qweight)."""
    return pack_cols(codes.T.contiguous(), bits).T.contiguous()


def pack_awq(codes: Tensor) -> Tensor:
    """Pack 4-bit `[rows, cols]` codes along dim 1 in AWQ's interleaved order: int32 `[rows, cols / 8]`."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"{cols} columns are not a multiple of 8, needed by AutoAWQ's packing")
    order = torch.tensor(AWQ_ORDER)
    interleaved = codes.reshape(rows, cols // 8, 8)[:, :, order].reshape(rows, cols)
    return pack_cols(interleaved, 4)
