"""Real quantized exports: the registry every format plugs into, and the per-layer view they read.

A format is an `Exporter`: the `save.<key>` flag that asks for it, the subfolder it writes,
`check(cfg)` that refuses impossible combinations before any calibration runs, and
`write(model, tokenizer, folder, cfg)` that writes a complete checkpoint folder. Formats
register themselves on import (every module of this package is imported), so a new format
touches neither the runner nor the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from llmc.config.schema import LlmcConfig
from llmc.quant.fake_linear import FakeQuantLinear, fake_quant_modules
from llmc.quant.quantizer import IntQuantizer


@dataclass(frozen=True)
class Exporter:
    key: str
    """The `save.<key>` flag, e.g. save_vllm."""
    folder: str
    """Subfolder of save_path the checkpoint goes to."""
    check: Callable[[LlmcConfig], None]
    """Raise ConfigError for a config this format cannot express (runs before calibration)."""
    write: Callable[[nn.Module, object, Path, LlmcConfig], None]
    """Write the checkpoint (model with FakeQuantLinear layers) into an existing empty folder."""


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> Exporter:
    if exporter.key in EXPORTERS:
        raise ValueError(f"exporter {exporter.key} registered twice")
    EXPORTERS[exporter.key] = exporter
    return exporter


def requested_exporters(cfg: LlmcConfig) -> list[Exporter]:
    return [e for key, e in EXPORTERS.items() if getattr(cfg.save, key, False)]


@dataclass
class QuantizedLinear:
    """One quantized linear as an exporter sees it: integer codes and their parameters.

    `codes` are int32 `[out, in]` in the quantizer's range (signed for symmetric, 0..2^b-1
    for asymmetric); `scale`/`zero` are float `[out, n_groups]` (n_groups = 1 for per-channel);
    dequantized weight = (codes - zero[:, g_idx]) * scale[:, g_idx]. `g_idx[j]` is column j's
    group (contiguous `j // group_size` unless GPTQ act-order made it arbitrary).
    """

    name: str
    module: FakeQuantLinear
    quantizer: IntQuantizer
    codes: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor

    def dequantized(self) -> Tensor:
        idx = self.g_idx.long()
        return (self.codes.float() - self.zero[:, idx]) * self.scale[:, idx]


def quantized_linears(model: nn.Module) -> list[QuantizedLinear]:
    """Integer view of every FakeQuantLinear; dequantized() equals module.fake_weight() in float32."""
    out = []
    for name, module in fake_quant_modules(model):
        q = module.weight_quantizer
        if q.granularity not in ("per_channel", "per_group"):
            raise ValueError(f"{name}: export supports per_channel and per_group weights, not {q.granularity}")
        rows, cols = module.out_features, module.in_features
        scale = module.w_scale.float().reshape(rows, -1).cpu()
        zero = module.w_zero.float().reshape(rows, -1).cpu()
        g_idx = getattr(module, "g_idx", None)
        if g_idx is None:
            step = q.group_size if q.granularity == "per_group" else cols
            g_idx = torch.arange(cols) // step
        g_idx = g_idx.to(torch.int32).cpu()
        w = module.weight.detach().float().cpu()
        idx = g_idx.long()
        codes = torch.clamp((w / scale[:, idx]).round() + zero[:, idx], q.qmin, q.qmax).to(torch.int32)
        out.append(QuantizedLinear(name, module, q, codes, scale, zero, g_idx))
    return out
