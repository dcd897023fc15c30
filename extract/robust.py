"""Deprecated alias: the noise-robustness experiment moved to `wat.robust` (an application above the
stages, folder robust/). `from wat.extract.robust import run_robust` keeps working (same objects,
with a DeprecationWarning); its sub-modules are `wat.robust.*` only, so that every module has one name."""
import warnings

from wat.robust import *  # noqa: F401,F403  (the same objects: one module, one name)
from wat.robust import __all__  # noqa: F401

warnings.warn("wat.extract.robust is deprecated: import wat.robust instead", DeprecationWarning, stacklevel=2)
