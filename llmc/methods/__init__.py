"""Compression methods, one file each. Every module in this package is imported here, and
importing a method's module registers it: a new method is a new file, nothing else."""

import importlib
import pkgutil

from llmc.methods.base import METHODS, QuantMethod, get_method, get_methods, method_class, register_method

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "QuantMethod", "get_method", "get_methods", "method_class", "register_method"]
