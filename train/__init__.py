"""wat.train: audio-tagging heads on the feature cache, and the trainer behind `wat-train`."""
from .heads import HeadError, HeadInfo, build_head, load_head, save_head

__all__ = ["HeadError", "HeadInfo", "build_head", "load_head", "save_head"]
