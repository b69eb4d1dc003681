"""Quantizers by `quant_type`: one interface, one registry.

Every quantizer is a frozen dataclass with the same interface (`IntQuantizer` is the reference):
`rows`/`unrows` (the rows that share one scale), `params_from_range`, `calc_qparams` (ranges from
an observer of `llmc.quant.observers`), `quantize` (codes), `quant_dequant` and `fake_quant`
(straight-through in the backward pass), `for_dtype` (scales representable in a weight's dtype),
and the fields `bit`, `symmetric`, `granularity`, `group_size`, `calib_algo`. A new format is one
builder registered here under its `quant_type`; the config's `quant_type` picks it, per module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmc.quant.fp8 import FP8Quantizer
from llmc.quant.fp8_block import FP8BlockQuantizer
from llmc.quant.microscaling import MXQuantizer, NVFP4Quantizer
from llmc.quant.quantizer import IntQuantizer

Quantizer = IntQuantizer | FP8Quantizer | FP8BlockQuantizer | NVFP4Quantizer | MXQuantizer
Builder = Callable[[Any, str], Quantizer]
"""`builder(section, role)`: a quantizer from a `quant.weight` or `quant.act` section; role is weight or act."""

QUANTIZERS: dict[str, Builder] = {}


def register_quantizer(quant_type: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        QUANTIZERS[quant_type] = builder
        return builder

    return add


def build_quantizer(section: Any, role: str = "weight") -> Quantizer:
    """The quantizer a config section (`quant.weight`, `quant.act`) describes."""
    builder = QUANTIZERS.get(section.quant_type)
    if builder is None:
        raise ValueError(f"unknown quant_type {section.quant_type!r}; use one of {', '.join(QUANTIZERS)}")
    return builder(section, role)


@register_quantizer("int-quant")
def _int(section: Any, role: str) -> IntQuantizer:
    weight = role == "weight"
    return IntQuantizer(
        bit=section.bit, symmetric=section.symmetric, granularity=section.granularity,
        group_size=section.group_size if weight else -1, calib_algo=section.calib_algo,
        partial_group=section.partial_group if weight else False, percentile=section.percentile,
        sym_scale=section.sym_scale,
    )


@register_quantizer("float-quant")
def _float(section: Any, role: str) -> FP8Quantizer | FP8BlockQuantizer:
    if section.granularity in ("per_block", "per_group"):  # weight blocks, or per-token groups of activations
        return FP8BlockQuantizer(granularity=section.granularity, block_size=getattr(section, "block_size", 128),
                                 group_size=max(section.group_size, 1), calib_algo=section.calib_algo,
                                 percentile=section.percentile)
    return FP8Quantizer(granularity=section.granularity, calib_algo=section.calib_algo, bit=section.bit,
                        percentile=section.percentile)


@register_quantizer("nvfp4")
def _nvfp4(section: Any, role: str) -> NVFP4Quantizer:
    return NVFP4Quantizer(calib_algo=section.calib_algo, percentile=section.percentile, dynamic_groups=role == "act")


@register_quantizer("mxfp4")
def _mxfp4(section: Any, role: str) -> MXQuantizer:
    return MXQuantizer(bit="e2m1", calib_algo=section.calib_algo, percentile=section.percentile,
                       dynamic_groups=role == "act")


@register_quantizer("mxfp8")
def _mxfp8(section: Any, role: str) -> MXQuantizer:
    return MXQuantizer(bit="e4m3", calib_algo=section.calib_algo, percentile=section.percentile,
                       dynamic_groups=role == "act")
