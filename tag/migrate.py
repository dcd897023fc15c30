"""`parse_at_label` for people coming from the whisper-at package: same arguments, same output
shape, computed from a `transcribe_and_tag(..., keep_scores=None)` result.

Two documented differences from whisper-at's own function:
- `p_threshold` is a probability (sigmoid of the logit for multi-label heads, softmax for
  single-label ones), not a logit. The default -1 keeps every tag; whisper-at's default -1 is a
  logit, i.e. a probability of 0.269 for a sigmoid head: pass 0.269 for the same cut.
- `include_class_list` is applied before `top_k` (whisper-at takes the top k first and then drops
  the classes not listed, so it can return fewer than k tags of interest).
Window times are wat's: `[k*res, (k+1)*res)`, the last window ending at the end of the audio
(whisper-at's last window nominally ends at `(k+1)*res`). Label names are English only (whisper-at
falls back to English for languages it has no names for; here every language does, with a warning).
"""
from __future__ import annotations

import warnings

from .tagging import TagError, select_tags


def parse_at_label(result: dict, language: str = "follow_asr", top_k: int = 5, p_threshold: float = -1,
                   include_class_list=None) -> list[dict]:
    """`[{"time": {"start": s, "end": e}, "audio tags": [(name, probability), ...]}, ...]`, one
    entry per tag window, like whisper-at's `parse_at_label`. `result` must hold every class's
    score: `transcribe_and_tag(..., keep_scores=None)` (wat-tag's JSON output with its default
    `--keep-scores all`)."""
    windows = result.get("audio_tags")
    classes = result.get("audio_classes")
    if windows is None or classes is None or any("scores" not in w for w in windows):
        raise TagError("parse_at_label needs the scores of every class: call transcribe_and_tag with "
                       "keep_scores=None (wat-tag: --keep-scores all, the default)")
    if language == "follow_asr":
        language = result.get("language") or "en"
    if language != "en":
        warnings.warn(f"{language} label names are not available; using English label names", stacklevel=2)
    wanted = None if include_class_list is None else [int(i) for i in include_class_list]
    if wanted is not None and any(not 0 <= i < len(classes) for i in wanted):
        raise TagError(f"include_class_list holds an index outside 0..{len(classes) - 1}")
    index = {name: i for i, name in enumerate(classes)}
    out = []
    for w in windows:
        probs = [0.0] * len(classes)
        for name, p in w["scores"].items():
            probs[index[name]] = p
        if len(w["scores"]) < len(classes):
            raise TagError("parse_at_label needs the scores of every class, this result kept "
                           f"{len(w['scores'])} of {len(classes)} (keep_scores=None)")
        tags = select_tags(probs, classes, top_k=top_k, classes=wanted,
                           threshold=None if p_threshold is None or p_threshold <= 0 else p_threshold)
        out.append({"time": {"start": w["start"], "end": w["end"]}, "audio tags": tags})
    return out
