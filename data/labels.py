"""Label vocabularies: AudioSet MIDs, class names, and the ontology.

A `Vocabulary` is the ordered list of classes a dataset, a cache and a head agree on. Keys are
stable identifiers (AudioSet MIDs such as ``/m/09x0r``, or class names for ESC-50 and folder
datasets); names are what a person reads.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from .errors import WatError


class LabelError(WatError, ValueError):
    """A label that is not in the vocabulary, or a malformed label field."""


@dataclass(frozen=True)
class Vocabulary:
    keys: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if len(self.keys) != len(self.names):
            raise LabelError(f"{len(self.keys)} keys but {len(self.names)} names")
        if len(set(self.keys)) != len(self.keys):
            raise LabelError("vocabulary keys are not unique")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def _positions(self) -> dict[str, int]:
        # frozen dataclass: cache the lookup table on first use
        table = self.__dict__.get("_table")
        if table is None:
            table = {k: i for i, k in enumerate(self.keys)}
            object.__setattr__(self, "_table", table)
        return table

    def index(self, key: str) -> int:
        try:
            return self._positions[key.strip()]
        except KeyError:
            raise LabelError(f"unknown label {key.strip()!r} (not among the {len(self)} classes)") from None

    def parse(self, text: str, sep: str = ",") -> tuple[int, ...]:
        """`"/m/09x0r,/m/05zppz"` -> sorted unique indices. Empty text gives no labels."""
        parts = [p.strip() for p in text.split(sep)]
        return tuple(sorted({self.index(p) for p in parts if p}))

    def to_json(self) -> str:
        return json.dumps({"keys": list(self.keys), "names": list(self.names)})

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        d = json.loads(text)
        return cls(tuple(d["keys"]), tuple(d["names"]))

    @classmethod
    def from_names(cls, names) -> "Vocabulary":
        names = tuple(names)
        return cls(names, names)


def _plain(text: str) -> str:
    # "Vacuum_cleaner", "vacuum-cleaner" and "Vacuum cleaner" are one class name
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def class_rows(vocab: Vocabulary, source: Vocabulary) -> list[int | None]:
    """For each class of `vocab`, the class of `source` it is (None: none): the same key (an AudioSet
    MID), else the same name (case, '_', '-' and spaces ignored: "vacuum_cleaner" is AudioSet's
    "Vacuum cleaner"). A source class is used once at most. This is how a head fine-tuned on
    another vocabulary keeps its outputs."""
    by_key = {k: i for i, k in enumerate(source.keys)}
    by_name = {}
    for i, name in enumerate(source.names):
        by_name.setdefault(_plain(name), i)
    out, used = [], set()
    for key, name in zip(vocab.keys, vocab.names):
        hit = by_key.get(key)
        for text in (key, name):
            if hit is None:
                hit = by_name.get(_plain(text))
        out.append(None if hit in used else hit)
        used.add(hit)
    return out


def _package_file(name: str):
    return resources.files("wat.data").joinpath("audioset", name)


@lru_cache(maxsize=1)
def audioset_vocabulary() -> Vocabulary:
    """The 527 AudioSet evaluation classes in their conventional order."""
    with _package_file("class_labels_indices.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: int(r["index"]))
    return Vocabulary(tuple(r["mid"] for r in rows), tuple(r["display_name"] for r in rows))


@lru_cache(maxsize=1)
def audioset_ontology() -> dict[str, dict]:
    """AudioSet ontology nodes by id (CC BY-SA 4.0, Google; see audioset/README.md)."""
    with _package_file("ontology.json").open(encoding="utf-8") as f:
        return {node["id"]: node for node in json.load(f)}


def parent_labels(vocab: Vocabulary) -> tuple[Vocabulary, list[tuple[int, ...]]]:
    """Extend `vocab` with the ontology ancestors of its classes.

    Returns the extended vocabulary (the original classes in their order, then every ancestor not
    already a class, in ontology-file order, abstract ones included) and, per original class, the
    sorted extended indices of all nodes above it. Keys that are not ontology nodes (ESC-50 names,
    folder classes) have no ancestors. Training on the 527 AudioSet classes plus these ancestors is
    the Whisper-AT seed's parent-label trick; evaluation stays on the original classes.
    """
    ontology = audioset_ontology()
    parents: dict[str, list[str]] = {}
    for node in ontology.values():
        for child in node["child_ids"]:
            parents.setdefault(child, []).append(node["id"])

    def above(mid: str) -> set[str]:
        seen, stack = set(), [mid]
        while stack:
            for p in parents.get(stack.pop(), ()):
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        return seen

    per_class = [above(k) for k in vocab.keys]
    known = set(vocab.keys)
    wanted = set().union(*per_class) - known
    extra = [mid for mid in ontology if mid in wanted]
    extended = Vocabulary(vocab.keys + tuple(extra), vocab.names + tuple(ontology[m]["name"] for m in extra))
    return extended, [tuple(sorted(extended.index(m) for m in a)) for a in per_class]


def expand_labels(labels, ancestors: list[tuple[int, ...]]) -> tuple[int, ...]:
    """A clip's label indices plus the indices of all their ancestors (sorted, unique)."""
    out = set(labels)
    for i in labels:
        out.update(ancestors[i])
    return tuple(sorted(out))
