"""What a training run is asked to do (`TrainOptions`), its typed errors, and the schedule the
options imply (learning-rate milestones, weight-averaging epochs)."""
from __future__ import annotations

from dataclasses import dataclass
from wat.data.errors import WatError


class TrainError(WatError, ValueError):
    """Input the trainer cannot use (labels, vocabularies, folds, options)."""


class Interrupted(WatError):
    """Raised by `train` when `max_epochs_this_run` stops a run early (last.pt is written)."""


@dataclass
class TrainOptions:
    features: str
    out: str
    head: str | None = None             # head kind; None: the --init head's kind (and projection), else tl-tr
    eval_features: str | None = None
    folds: int = 0                      # >0: cross-validation over the cache's folds
    proj_dim: int | None = None         # TL-Tr / WA-Tr projection width (None = encoder width)
    epochs: int = 30
    lr: float | str | None = None        # None: the head kind's default (Head.lr); "auto": searched (lrsearch)
    batch_size: int | None = None       # None: BATCH (48), smaller on small sets (default_batch)
    mixup: float = 0.5                  # probability per clip; lambda ~ Beta(10, 10)
    time_mask: int = 10                 # up to this many frames, same on all layers (not for MLP heads)
    feature_mask: int | None = None     # up to this many feature dims; None = 0, or encoder width // 10 with CR views
    label_smoothing: float = 0.1
    balanced: bool = False
    cr_views: int = 1
    cr_weight: float = 1.0
    unlabeled_features: str | None = None
    cr_unlabeled_weight: float = 1.0
    unlabeled_ratio: int = 4            # unlabeled clips per labeled clip in each step
    parent_labels: bool = False
    weight_average: tuple[int, int] | None = None  # 1-based inclusive epochs; None = second half
    init: str | None = None             # start from a head file (ours or official) or "whisper-at"/"whisper-at-low"
    allow_policy_mismatch: bool = False  # --init from a head trained on features of another input policy
    probe_start: bool | None = None     # start as the best layer's probe, kept where a trial's training does not beat it
                                        # on held-back training clips (train/warmstart.py); None: on up to PROBE_START_CLIPS, no --init
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    memory_budget: int | None = None    # bytes for the in-memory store; None = half of free memory
    max_epochs_this_run: int | None = None  # stop (Interrupted) after this many epochs: tests, time limits
    progress: bool | None = None        # None: as wat.data.clikit.progress is set (bar on a TTY, else log lines); False: none
    tensorboard: str | None = None      # folder for TensorBoard event files (per-epoch scalars); None = off




PROBE_START_CLIPS = 4000  # probe_start None: on for sets of up to this many training clips (its fits take seconds there)
PROBE_START_MIN = 10      # and of at least this many (a fifth is held back: at least 2)
BATCH = 48      # the paper's batch (AudioSet: 40,000 steps an epoch)
MIN_STEPS = 8   # the default batch gives every epoch at least this many steps (small sets, see default_batch)


def default_batch(n_train: int, world_size: int = 1) -> int:
    """The batch when --batch-size is not given: BATCH, or smaller when the training clips would
    make fewer than MIN_STEPS steps an epoch (70 demo clips in batches of 48 were 2 steps an epoch,
    60 in a whole run: every head kind stopped well short of the linear probe; BENCHMARKS.md,
    "Default training recipe"). Sets of MIN_STEPS x BATCH (384) clips or more keep the paper's
    batch. A multiple of the process count (it is the global batch)."""
    b = min(BATCH, max(1, n_train // MIN_STEPS))
    return max(world_size, b - b % world_size)


def milestones(epochs: int) -> list[int]:
    """MultiStepLR milestones: official recipe (from epoch 15 every 5, x0.75) for runs of 30+
    epochs; shorter runs scale both to the run (start at half, step a sixth), so decay still happens."""
    start, step = (15, 5) if epochs >= 30 else (max(1, round(epochs / 2)), max(1, round(epochs / 6)))
    return list(range(start, epochs, step))


def wa_range(opts: TrainOptions) -> tuple[int, int]:
    a, b = opts.weight_average or (opts.epochs // 2 + 1, opts.epochs)
    if not 1 <= a <= b <= opts.epochs:
        raise TrainError(f"--weight-average {a}:{b} must lie within epochs 1..{opts.epochs}")
    return a, b
