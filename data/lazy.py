"""Packages whose names load on first use (PEP 562): a command's --help imports the package without
torch or whisper, and `from wat.extract import load_whisper` still works.

    __getattr__, __dir__ = lazy_names(__name__, {"load_whisper": "load", ...}, __all__)"""
from __future__ import annotations

import importlib
import sys


def lazy_names(package: str, where: dict[str, str], public: list[str]):
    """(`__getattr__`, `__dir__`) for `package`: name -> the module that defines it (a sub-module's
    name relative to `package`, or a full `wat.` name)."""
    def __getattr__(name):
        if name in where:
            module = where[name]
            value = getattr(importlib.import_module(module if module.startswith("wat.") else f".{module}", package),
                            name)
            setattr(sys.modules[package], name, value)  # later lookups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__
