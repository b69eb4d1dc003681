"""Quantized checkpoint formats; importing this package registers every format module in it."""

import importlib
import pkgutil

from llmc.export.base import (
    EXPORTERS,
    Exporter,
    QuantizedLinear,
    quantized_linears,
    register_exporter,
    requested_exporters,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["EXPORTERS", "Exporter", "QuantizedLinear", "quantized_linears", "register_exporter", "requested_exporters"]
