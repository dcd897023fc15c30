"""wat-tag: a Whisper transcript and audio-event tags from the same encoder passes."""
from wat.data.lazy import lazy_names

MIN_RES = 0.1  # seconds, the shortest tag window; below ~5 encoder frames per window tags mean little

__all__ = ["transcribe_and_tag", "parse_at_label", "TagError", "check_head", "select_tags", "resolve_classes",
           "WindowPool", "MIN_RES", "Tagger", "transcribe_batch", "tag_only", "tag_only_encoder"]
# loaded on first use: `wat-tag --help` imports no torch or whisper
__getattr__, __dir__ = lazy_names(__name__, {"WindowPool": "grid", "parse_at_label": "migrate",
                                             **dict.fromkeys(("transcribe_batch", "tag_only", "tag_only_encoder"), "batch"),
                                             **dict.fromkeys(("TagError", "Tagger", "check_head", "resolve_classes",
                                                              "select_tags", "transcribe_and_tag"), "tagging")}, __all__)
