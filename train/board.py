"""`--tensorboard DIR`: per-epoch scalars in TensorBoard event files, to watch a long run live
(`tensorboard --logdir DIR`).

Layout follows TensorBoard's runs-are-folders convention: one sub-folder per fold (`fold1`,
`fold2`, ...) plus `mean` for the fold average, or DIR itself for a single split; the same tags in
every run, so TensorBoard overlays the folds in one chart:

    train/loss                    mean training loss of the epoch
    train/lr                      learning rate used in the epoch
    heldout/<metric>              held-out accuracy or mAP after the epoch
    heldout/<metric>_weight_avg   the same for the running weight average (inside the averaging
                                  window; the last value is the score of wa.pt)
"""
from __future__ import annotations

import math
from pathlib import Path

from wat.data import DIST

from .options import TrainError


class BoardError(TrainError):
    """TensorBoard logging asked for but not possible (package missing, DIR not a folder)."""


def check(logdir) -> None:
    """Fail before any training when logging cannot work (a long run must not fail at epoch 1)."""
    if not str(logdir).strip():
        raise BoardError("--tensorboard needs a folder name")
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        raise BoardError(f"--tensorboard needs the tensorboard package: pip install '{DIST}[tensorboard]'") from None
    root = Path(logdir)
    if root.exists() and not root.is_dir():
        raise BoardError(f"--tensorboard {logdir}: exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BoardError(f"--tensorboard {logdir}: cannot create the folder ({e.strerror or e})") from None


class Board:
    """Per-epoch scalars for one run (all its folds); `close` flushes the event files."""

    def __init__(self, logdir, names: list[str], resume_epoch: int = 0):
        check(logdir)
        from torch.utils.tensorboard import SummaryWriter
        root = Path(logdir)
        runs = names if len(names) == 1 and names[0] == "main" else [*names, "mean"]
        # resume: events of epochs after the checkpoint (written before an interruption) are dropped
        purge = {"purge_step": resume_epoch + 1} if resume_epoch else {}
        self.writers = {n: SummaryWriter(str(root if n == "main" else root / n), **purge) for n in runs}

    def epoch(self, rec: dict, metric: str) -> None:
        """Log one epoch record of the run history (`epoch`, `lr`, `train_loss`, `score`, optional
        `score_wa`; per fold under `folds` when the run has folds)."""
        step = rec["epoch"]
        per_run = {**rec.get("folds", {}), ("mean" if "folds" in rec else "main"): rec}
        for name, r in per_run.items():
            w = self.writers[name]
            w.add_scalar("train/lr", r.get("lr", rec["lr"]), step)  # per fold: --lr auto may differ
            for tag, key in (("train/loss", "train_loss"), (f"heldout/{metric}", "score"),
                             (f"heldout/{metric}_weight_avg", "score_wa")):
                v = r.get(key)
                if v is not None and math.isfinite(v):
                    w.add_scalar(tag, v, step)
            w.flush()   # a live view: visible as soon as the epoch ends

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
