"""Declarations of the supported model families: one module per family (or per set of
families sharing a layout), each registering its adapters on import. Every module in this
package is imported, so a new family is one new file."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
