"""wat.train: the trainer behind `wat-train` (heads on the feature cache). The head schema itself
(architectures, kinds, checkpoints) lives in `wat.data.heads`; it is re-exported here."""
from wat.data.heads import HeadError, HeadInfo, build_head, load_head, save_head

__all__ = ["HeadError", "HeadInfo", "build_head", "load_head", "save_head"]
