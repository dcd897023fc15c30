"""wat-tag: a Whisper transcript and audio-event tags from the same encoder passes."""
from .grid import WindowPool
from .migrate import parse_at_label
from .tagging import TagError, check_head, resolve_classes, select_tags, transcribe_and_tag

__all__ = ["transcribe_and_tag", "parse_at_label", "TagError", "check_head", "select_tags", "resolve_classes", "WindowPool"]
