"""wat.train: the trainer behind `wat-train` (heads on the feature cache). The head schema itself
(architectures, kinds, checkpoints) lives in `wat.data.heads`; it is re-exported here (loaded on
first use: `wat-train --help` imports no torch)."""
from wat.data.lazy import lazy_names

__all__ = ["HeadError", "HeadInfo", "build_head", "load_head", "save_head"]
__getattr__, __dir__ = lazy_names(__name__, dict.fromkeys(__all__, "wat.data.heads"), __all__)
