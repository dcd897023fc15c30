"""wat-tag: a Whisper transcript and audio-event tags from the same encoder passes."""
from .grid import WindowPool
from .tagging import TagError, check_head, resolve_classes, select_tags, transcribe_and_tag

__all__ = ["transcribe_and_tag", "TagError", "check_head", "select_tags", "resolve_classes", "WindowPool"]
