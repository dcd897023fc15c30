"""Deprecated alias: the tagger moved to `wat.tag` (an application above the stages, folder tag/).
`from wat.extract.tag import transcribe_and_tag` keeps working (same objects, with a
DeprecationWarning); its sub-modules are `wat.tag.*` only, so that every module has one name."""
import warnings

from wat.tag import *  # noqa: F401,F403  (the same objects: one module, one name)
from wat.tag import __all__  # noqa: F401

warnings.warn("wat.extract.tag is deprecated: import wat.tag instead", DeprecationWarning, stacklevel=2)
