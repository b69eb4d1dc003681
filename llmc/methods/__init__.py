"""Compression methods, one file each; importing a module registers its method."""

from llmc.methods import rtn  # noqa: F401
from llmc.methods.base import METHODS, QuantMethod, get_method, get_methods, method_class, register_method

__all__ = ["METHODS", "QuantMethod", "get_method", "get_methods", "method_class", "register_method"]
