"""Word error rate as the paper scores it: Whisper's English text normaliser, then jiwer's word
alignment; corpus-level, i.e. the sum of substitutions + deletions + insertions over the sum of
reference words (never a mean of per-utterance rates)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def _normalizer():
    from whisper.normalizers import EnglishTextNormalizer
    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return _normalizer()(text)


@dataclass(frozen=True)
class Errors:
    words: int    # reference words after normalisation
    errors: int   # substitutions + deletions + insertions

    def __add__(self, other: "Errors") -> "Errors":
        return Errors(self.words + other.words, self.errors + other.errors)

    @property
    def wer(self) -> float:
        return self.errors / self.words if self.words else float("nan")


def errors(reference: str, hypothesis: str) -> Errors:
    """Word errors of one hypothesis against its reference, both normalised first. A reference that
    normalises to nothing raises ValueError (it has no words to score against)."""
    import jiwer

    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref.split():
        raise ValueError("the reference transcript is empty after normalisation")
    out = jiwer.process_words(ref, hyp)
    return Errors(len(ref.split()), out.substitutions + out.deletions + out.insertions)


def corpus(pairs) -> Errors:
    """Summed errors over (reference, hypothesis) pairs: `.wer` is the corpus-level WER."""
    total = Errors(0, 0)
    for ref, hyp in pairs:
        total = total + errors(ref, hyp)
    return total
