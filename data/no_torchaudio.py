"""Importing a package whose import pulls in torchaudio for features wat never uses, where
torchaudio cannot be imported beside wat's torch.

Why: torchaudio wheels are built for one torch release and one device build (PyPI's x86_64
torchaudio is a CUDA build pinned to its own torch version). Installing it from PyPI next to
another torch either replaces that torch (pip resolves torchaudio's exact `torch==` pin) or, with
`--no-deps`, fails at import (`OSError: libc10_cuda.so` beside a CPU torch). wat therefore never
installs torchaudio. Two packages wat uses import it at module level anyway:

- torchcrepe (CREPE, `wat.extract.encoders.crepe`): only `torchcrepe.load.audio` (file loading)
  calls it; wat hands torchcrepe decoded samples.
- xares (the X-ARES benchmark adapter): only `xares.audiowebdataset` calls
  `torchaudio.functional.resample`, when a task's sample rate differs from the encoder's.

`import_without_torchaudio("torchcrepe")` imports the package with the real torchaudio when it
imports; otherwise, for the duration of that import only, `sys.modules["torchaudio"]` is a
placeholder module whose every attribute raises `TorchaudioUnavailable`: one line naming the
attribute, why torchaudio is missing and who wanted it. Nothing is faked: a code path that needs
torchaudio fails loudly where it would have called it; the paths wat uses never touch it. After the
import the placeholder is removed from `sys.modules` again (the imported modules keep their
reference), so any other `import torchaudio` in the process still sees the real failure.
"""
from __future__ import annotations

import importlib
import sys
import types

from wat.data.errors import WatError
from wat.data.files import one_line

PLACEHOLDER_ATTR = "__wat_placeholder__"  # set on the placeholder module: True


class TorchaudioUnavailable(WatError, ImportError):
    """A use of torchaudio by a package that was imported without it (`import_without_torchaudio`)."""


class _Placeholder(types.ModuleType):
    def __init__(self, reason: str, package: str):
        super().__init__("torchaudio", f"placeholder set by wat.data.no_torchaudio: {reason}")
        self.__dict__[PLACEHOLDER_ATTR] = True
        self.__dict__["_reason"], self.__dict__["_package"] = reason, package

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # the import system probes __path__, __spec__, ...: not torchaudio's API
            raise AttributeError(attr)
        raise TorchaudioUnavailable(
            f"torchaudio.{attr} is not available: {self._package} was imported without torchaudio, which "
            f"cannot be imported here ({self._reason}); wat never needs this torchaudio feature of "
            f"{self._package} - install a torchaudio built for this torch to use it")


def torchaudio_problem() -> str | None:
    """Why `import torchaudio` fails here (one line), or None when it imports."""
    before = set(sys.modules)
    try:
        importlib.import_module("torchaudio")
    except (ImportError, OSError) as e:  # not installed, or built for another torch / CUDA
        # a failed import may leave half-imported submodules behind: a later try must start clean
        for name in set(sys.modules) - before:
            if name == "torchaudio" or name.startswith("torchaudio."):
                del sys.modules[name]
        return f"{type(e).__name__}: {one_line(e)}"
    return None


def import_without_torchaudio(name: str) -> types.ModuleType:
    """`importlib.import_module(name)`, with a placeholder `torchaudio` (see the module docstring)
    while it is imported when the real one cannot be imported."""
    if name in sys.modules:
        return sys.modules[name]
    current = sys.modules.get("torchaudio")
    reason = None if current is not None else torchaudio_problem()
    if reason is None:
        return importlib.import_module(name)
    sys.modules["torchaudio"] = _Placeholder(reason, name.partition(".")[0])
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules["torchaudio"]
