"""Whisper-AT's Table 1 from finished `wat-train --folds`/`--eval-features` runs: one row per encoder and
head (WA-MLP, TL-Tr, ... on frozen features), a column per dataset, laid out as the paper does (the
encoder named once, its heads under it, head parameters beside them). Everything comes from each
run's metrics.json (and its cache's metadata when the cache is still there): nothing is typed in.

    wat-eval --table RUN_DIR [RUN_DIR ...] --out TABLE_DIR     # table.csv, table.md, printed row by row
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from wat.data.files import atomic_write, write_csv
from wat.data.errors import WatError

HEAD_NAMES = {"wa-mlp": "WA-MLP", "last-mlp": "Last-MLP", "wa-tr": "WA-Tr", "tl-tr": "TL-Tr"}


class TableError(WatError):
    """A run folder that cannot be read into the table."""


@dataclass(frozen=True)
class Row:
    model: str            # the encoder as its cache names it, with the input policy
    head: str             # the paper's spelling: WA-MLP, TL-Tr128, ...
    params: int           # head parameters
    dataset: str          # the training cache's dataset (a column of the table)
    metric: str           # accuracy | mAP
    score: float          # weight-averaged head (the recipe's final head): fold mean, or on the eval cache
    std: float | None     # over folds (None: one eval cache)
    best: float           # at the epoch chosen on the held-out score (optimistic: chosen on them)
    run: str


def head_label(kind: str, proj_dim) -> str:
    """The paper's spelling: TL-Tr with its projection width (TL-Tr512), WA-MLP, ..."""
    name = HEAD_NAMES.get(kind, kind)
    return f"{name}{proj_dim}" if proj_dim and kind.endswith("-tr") else name


def _dataset(options: dict, run: Path) -> str:
    """The training cache's dataset name from its metadata (the cache may have moved: then its file name)."""
    from wat.data.cache import CacheError, open_cache

    path = Path(str(options.get("features", "")))
    if not path.is_absolute():
        path = (Path.cwd() / path)
    try:
        return open_cache(path).meta.dataset
    except (CacheError, OSError, ValueError):
        return path.stem or run.name


def read_run(run) -> Row:
    run = Path(run)
    path = run / "metrics.json"
    try:
        m = json.loads(path.read_text())
        final, head, cache, options = m["final"] or {}, m["head"], m["cache"], m["options"]
    except FileNotFoundError:
        raise TableError(f"{run}: no metrics.json (not a wat-train output folder, or the run has not started)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TableError(f"{path}: unreadable metrics ({e})") from None
    if final.get("wa") is None:
        raise TableError(f"{run}: the run has no held-out score (train with --folds K or --eval-features; "
                         "an unfinished run has no final score yet)")
    folds = [f["wa"] for f in (final.get("folds") or {}).values()]
    std = float(sum((v - final["wa"]) ** 2 for v in folds) / len(folds)) ** 0.5 if folds else None
    return Row(model=f"{cache.get('model') or '?'} ({cache.get('policy') or '?'})",
               head=head_label(head["kind"], head.get("proj_dim")), params=int(head["n_parameters"]),
               dataset=_dataset(options, run), metric=final.get("metric", "score"), score=float(final["wa"]),
               std=std, best=float(final["best"]), run=str(run))


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"


def _cell(r: Row | None) -> str:
    if r is None:
        return "-"
    value = f"{100 * r.score:.1f}"
    return value + (f" ± {100 * r.std:.1f}" if r.std is not None and math.isfinite(r.std) else "")


def build(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """(header, lines): one line per (model, head) in the order first given, the model named on its
    first line only; a column per (dataset, metric)."""
    columns = list(dict.fromkeys((r.dataset, r.metric) for r in rows))
    keys = list(dict.fromkeys((r.model, r.head) for r in rows))
    at = {(r.model, r.head, r.dataset, r.metric): r for r in rows}
    header = ["model", "head", "params"] + [f"{d} {m} (%)" for d, m in columns]
    lines, last = [], None
    for model, head in keys:
        cells = [at.get((model, head, d, m)) for d, m in columns]
        params = next(r.params for r in cells if r is not None)
        lines.append([model if model != last else "", head, _params(params)] + [_cell(r) for r in cells])
        last = model
    return header, lines


def markdown(header, lines) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def write_table(runs, out) -> tuple[list[str], list[list[str]], list[Row]]:
    """Read every run, write OUT/table.csv (one row per run, every figure) and OUT/table.md (the
    paper's layout); returns the layout and the rows."""
    if not runs:
        raise TableError("no run folders given")
    rows = [read_run(r) for r in runs]
    seen = {}
    for r in rows:
        key = (r.model, r.head, r.dataset, r.metric)
        if key in seen:
            raise TableError(f"{r.run} and {seen[key]} are the same cell ({r.model}, {r.head}, {r.dataset}): give one")
        seen[key] = r.run
    header, lines = build(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "table.csv", ["model", "head", "params", "dataset", "metric", "score", "std", "best_epoch_score",
                                  "run"],
              [(r.model, r.head, r.params, r.dataset, r.metric, r.score, r.std, r.best, r.run) for r in rows])
    atomic_write(out / "table.md", markdown(header, lines) +
               "\nScores in %: the weight-averaged head (fold mean ± std over folds), frozen encoders.\n")
    return header, lines, rows


__all__ = ["TableError", "Row", "read_run", "build", "markdown", "write_table", "head_label"]
