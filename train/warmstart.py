"""Probe start: on a small set a head begins as the best layer's linear probe, and a trial on the
training clips decides whether the run's trained head or that start is kept (issue 23.3).

A head trained from a random start on a few hundred clips can end below a linear probe of one
layer of the same features (BENCHMARKS.md, "Heads against the probe on small sets"). With the probe
start (`TrainOptions.probe_start`; by default on sets of PROBE_START_MIN to PROBE_START_CLIPS
training clips, `train.loop`) each head:
1. starts as a linear probe fitted on ALL its training clips (`probe_start`): every block's residual
   branches at zero (a block is then the identity), the layer weights (WA-MLP, WA-Tr) one-hot on
   the layer whose probe scores best in an inner cross-validation, TL-Tr's layer block routed to
   pass that layer on, the classifier's LayerNorm affine standardising what it sees and its Linear
   = wat-probe's L2 logistic regression on it (`start_weights`: `wat.eval.logistic.fit_linear`, the
   probe's own fit, with its defaults); the run trains it on all its training clips (WA-MLP, WA-Tr
   and --probe-start on: `Start.train_from` "start"), or trains the head from its random start
   while the probe start waits as its rival (TL-Tr by default: "random");
2. before that, a trial (`trial`) decides what the run keeps: a fifth of the training clips is held
   back (`inner_split`: one of their cache folds when they span FOLDS_MIN or more, else seeded
   class-balanced groups; the evaluation clips are never seen), the same start is fitted on the
   rest, a head is trained there with the run's recipe from what the run trains from (that start or
   the random weights), and the trained weight-averaged head and the start are scored on the
   held-back clips; where the start scores higher, the run's head is the start of step 1
   (untrained) instead of the trained one.
Why a trial instead of training on four fifths and comparing at the end (this module's first
recipe): on 320 clips of 16 classes, a head or probe fitted on four fifths of the training clips
scored 6 points below the same fitted on all of them, so whichever the comparison kept lost those
points (BENCHMARKS.md). The trial costs a second training on four fifths of the clips (the run then
takes about 1.8 times as long); every draw of training comes from a generator (`augment`), the
trial's its own, so the run that follows is the run it would be without it; last.pt keeps the
trial's choice for --resume.
The architecture and its numerics are unchanged: only the initial weights and the final choice.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wat.data.files import json_safe
from wat.eval import logistic

from .distributed import from_main
from .epoch import side_run
from .evaluation import predict, score
from .inputs import COMPUTE, Setup
from .options import PROBE_START_CLIPS, PROBE_START_MIN, TrainOptions, wa_range
from .state import Fit

if TYPE_CHECKING:
    from wat.data.cache import FeatureStore

    from .distributed import World

INNER_K = 5       # a fifth of the training clips held back; inner cross-validation over 5 groups
FOLDS_MIN = 4     # the clips' cache folds are the groups when they span this many (a fold: at most a quarter)
ROUTE_MARGIN = 12.0  # TL-Tr routing: attention logits of the chosen layer above any other, every clip
# TL-Tr routing: the chosen layer's spread over the clips, times the layer mean's (which TL-Tr's
# classifier sees too). At 5 the layer mean still moved the start: on hard320 it scored 0.625 (5-fold
# mean) against 0.638 for that layer's exact probe; at 20 and at 100, 0.634 (bench/head_starts.py)
ROUTE_GAIN = 20.0


@torch.no_grad()
def inputs_of(module: nn.Module, head: nn.Module, store: "FeatureStore", indices: np.ndarray,
              batch_size: int = 256) -> torch.Tensor:
    """float64 on the CPU: the input of `module` (a part of `head`) for each clip of `indices`, in
    that order (the head in eval mode: no dropout, no augmentation)."""
    got: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda m, inp: got.append(inp[0].detach().double().cpu()))
    indices = np.asarray(indices)
    rows: list[np.ndarray] = []
    head.eval()
    try:
        for idx, x in store.iter_batches(indices, batch_size, shuffle=False, dtype=COMPUTE):
            head(x)
            rows.append(np.asarray(idx))
    finally:
        hook.remove()
        head.train()
    z = torch.cat(got)
    pos = {int(i): k for k, i in enumerate(np.concatenate(rows))}
    return z[torch.tensor([pos[int(i)] for i in indices])]


def pooled(head: nn.Module, store: "FeatureStore", indices: np.ndarray) -> torch.Tensor:
    """[len(indices), width]: what the head's classifier (LayerNorm, Linear) sees for each clip."""
    return inputs_of(head.mlp_layer[0], head, store, indices)


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def _standardised(z: torch.Tensor, by: torch.Tensor | None = None) -> torch.Tensor:
    ref = z if by is None else by
    return (z - ref.mean(0)) / ref.std(0, unbiased=False).clamp_min(1e-6)


def start_weights(z: torch.Tensor, y: np.ndarray, multilabel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C, D], b [C]) float64: wat-probe's linear probe on `z` (already standardised), the one fit
    `wat.eval.logistic.fit_linear` with the probe's defaults, on the CPU. Its -inf bias of a class
    absent from single-label clips becomes e^-10 odds below the least likely present class: a head
    trains from these weights, and -inf would stay -inf (no gradient reaches an absent class)."""
    from threadpoolctl import threadpool_limits

    # small fits: one BLAS thread beats a pool's hand-offs (on a loaded CPU, by 2-3x measured)
    with threadpool_limits(1):
        w, b = logistic.fit_linear(z.detach().cpu(), y, multilabel)
    w, b = w.double(), b.double()
    absent = torch.isinf(b)
    if absent.any():
        b[absent] = b[~absent].min() - 10.0
    return w, b


def inner_score(z: torch.Tensor, y: np.ndarray, groups: np.ndarray, multilabel: bool) -> float:
    """Mean held-out score (accuracy or mAP) of `start_weights` over the groups of the clips."""
    got = []
    for g in np.unique(groups):
        tr, te = torch.from_numpy(groups != g), torch.from_numpy(groups == g)
        w, b = start_weights(_standardised(z[tr]), y[tr.numpy()], multilabel)
        a = _standardised(z[te], z[tr]) @ w.T + b
        p = (torch.sigmoid(a) if multilabel else torch.softmax(a, 1)).float().numpy()
        got.append(score(y[te.numpy()], p, multilabel)["score"])
    return float(np.nanmean(got))


def groups_of(train_idx: np.ndarray, folds: np.ndarray, y: np.ndarray, seed: int, k: int = INNER_K) -> np.ndarray:
    """Inner groups of the training clips: their cache folds when they span FOLDS_MIN or more (clips
    of one source stay together), else `k` seeded groups balanced per (first) class."""
    f = folds[train_idx]
    if (f >= 0).all() and len(np.unique(f)) >= FOLDS_MIN:
        return f.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_idx))
    first = y[train_idx].argmax(1)
    g = np.empty(len(train_idx), np.int64)
    for c in np.unique(first):
        rows = order[first[order] == c]
        g[rows] = (np.arange(len(rows)) + rng.integers(k)) % k
    return g


def inner_split(train_idx: np.ndarray, folds: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clips to train on, clips held back): one inner group of the training clips held back."""
    g = groups_of(train_idx, folds, y, seed)
    held = g == np.unique(g)[0]
    return train_idx[~held], train_idx[held]


def zero_branches(head: nn.Module) -> None:
    """Every residual block's attention and MLP outputs at zero: the block is the identity (its
    other weights keep their random start, so training grows the branches from there)."""
    for m in head.modules():
        if hasattr(m, "attn") and hasattr(m, "mlp"):
            for lin in (m.attn.out, m.mlp[-1]):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)


@torch.no_grad()
def route_layers(head: nn.Module, tokens: torch.Tensor, k: int) -> bool:
    """TL-Tr's layer block (the identity so far) set to pass layer k on: every layer token attends
    to token k (a query bias along a direction that tells layer k's token from the others, ROUTE_MARGIN
    logits apart on every training clip) and adds its value, scaled so that in the layer mean that
    follows layer k varies over the clips ROUTE_GAIN times as much as the plain mean does.
    `tokens`: the block's input [N, L, d]. False (block left the identity) when no direction
    separates layer k's token from the others on every clip."""
    attn = head.layer_tr.attn
    a = _ln(tokens)                                   # the block's attn_ln at its start (identity affine)
    others = [l for l in range(a.shape[1]) if l != k]
    v = a[:, k].mean(0) - a[:, others].mean((0, 1))
    v = v / v.norm()
    s = a @ v                                         # [N, L]
    margin = float((s[:, k] - s[:, others].max(1).values).min())
    if margin <= 0:
        return False
    d = a.shape[-1]
    dh = d // attn.n_head
    beta = ROUTE_MARGIN * dh ** 0.5 / margin
    alpha = ROUTE_GAIN * float(tokens.mean(1).std(0).mean() / a[:, k].std(0).mean())
    for lin in (attn.query, attn.key, attn.value, attn.out):
        lin.weight.zero_()
        if lin.bias is not None:
            lin.bias.zero_()
    for h in range(attn.n_head):
        attn.query.bias[h * dh] = beta
        attn.key.weight[h * dh] = v.to(attn.key.weight)
    attn.value.weight.copy_(torch.eye(d))
    attn.out.weight.copy_(alpha * torch.eye(d))
    return True


@torch.no_grad()
def probe_start(head: nn.Module, store: "FeatureStore", indices: np.ndarray, y: np.ndarray, multilabel: bool,
                groups: np.ndarray, layer_weights=None) -> dict:
    """Set `head` (in place) to the linear probe of the layer that an inner cross-validation over
    `groups` of the clips `indices` (labels `y`, their rows) chooses; returns what was chosen.
    `layer_weights` (heads with layer weights): these instead of that choice (bench/head_starts.py)."""
    zero_branches(head)
    idx = np.asarray(indices)
    out: dict = {}
    lw = getattr(head, "layer_weight", None)
    if head.n_layers > 1 and lw is not None and layer_weights is not None:
        lw.copy_(torch.as_tensor(layer_weights).to(lw))
        out.update(layer_weights=[float(v) for v in layer_weights])
    elif head.n_layers > 1 and lw is not None:
        scores = []
        for k in range(head.n_layers):
            lw.copy_(F.one_hot(torch.tensor(k), head.n_layers).to(lw))
            scores.append(inner_score(pooled(head, store, idx), y, groups, multilabel))
        best = int(np.argmax(scores))
        lw.copy_(F.one_hot(torch.tensor(best), head.n_layers).to(lw))
        out.update(layer=best, inner_scores=scores)
    elif head.n_layers > 1 and hasattr(head, "layer_tr"):
        tokens = inputs_of(head.layer_tr, head, store, idx)   # [N, L, d]: each layer's time mean
        scores = [inner_score(_ln(tokens[:, k]), y, groups, multilabel) for k in range(head.n_layers)]
        best = int(np.argmax(scores))
        out.update(layer=best, inner_scores=scores, routed=route_layers(head, tokens, best))
    ln, linear = head.mlp_layer
    ln.weight.fill_(1.0)
    ln.bias.zero_()
    z = pooled(head, store, idx)
    mu, sd = (t.to(ln.weight) for t in (_ln(z).mean(0), _ln(z).std(0, unbiased=False).clamp_min(1e-6)))
    ln.weight.copy_(1 / sd)
    ln.bias.copy_(-mu / sd)
    w, b = start_weights(_standardised(_ln(z)), y, multilabel)
    linear.weight.copy_(w.to(linear.weight))
    linear.bias.copy_(b.to(linear.bias))
    return out


TRAIN_FROM = ("start", "random")  # what the run trains: the probe start, or its random weights (the start a rival)


def default_probe_start(head: nn.Module, n_layers: int, n_classes: int, train_sets: list, init: bool) -> str | None:
    """`Start.train_from` for `head` when --probe-start is left to its default, or None (no probe
    start): on sets of PROBE_START_MIN to PROBE_START_CLIPS training clips (every split of
    `train_sets`, training clip indices) of a cache of several layers, without --init (`init`).
    Heads with layer weights (WA-MLP, WA-Tr) train from the start. TL-Tr trained from the start lost
    to its random start on few100 (-2.0 vs +1.0) and hard320 (-2.2 vs -0.3), and won on demo110
    (+6.4 vs -2.7): BENCHMARKS.md, "Heads against the probe on small sets". So it trains from the
    random start, and the trial keeps the (untrained) probe start where it beats that training on
    the held-back fifth (so: within 2 points on all six sets at seed 0; demo110 +1.8, multi440 +0.6,
    hard320 -0.3). With fewer than INNER_K clips a class (of `n_classes`) in a split the fifth cannot
    hold every class: no trial (tests/test_train.py's 44-clip split, 4 a class: the random start
    0.750, the probe start 0.500). LastMLP is a probe of one layer already."""
    n = [len(tr) for tr in train_sets]
    if init or n_layers < 2 or min(n) < PROBE_START_MIN or max(n) > PROBE_START_CLIPS:
        return None
    if hasattr(head, "layer_weight"):
        return "start"
    if hasattr(head, "layer_tr") and min(n) >= INNER_K * n_classes:
        return "random"
    return None


class Start:
    """One head's probe start on all of `train_idx` (`start`); the clips its trial trains on and
    holds back, and the head's random weights before the start (`initial`: the trial's start is
    fitted on those, once; None after). `train_from` "start": `head` is set in place to the start
    (the run trains it); "random": `head` keeps its random weights (the run is the run without a
    probe start) and the start only competes with it in the trial."""

    def __init__(self, head: nn.Module, store: "FeatureStore", train_idx: np.ndarray, folds: np.ndarray,
                 y: np.ndarray, multilabel: bool, seed: int, train_from: str = "start"):
        if train_from not in TRAIN_FROM:
            raise ValueError(f"train_from: one of {TRAIN_FROM}, not {train_from!r}")
        self.all_idx = np.asarray(train_idx)
        self.trial_idx, self.held_idx = inner_split(self.all_idx, folds, y, seed)
        self.y, self.folds, self.multilabel, self.seed = y, folds, multilabel, seed
        self.train_from = train_from
        self.initial = copy.deepcopy(head)
        fitted = head if train_from == "start" else copy.deepcopy(head)
        self.info = {**probe_start(fitted, store, self.all_idx, y[self.all_idx], multilabel,
                                   groups_of(self.all_idx, folds, y, seed)), "trained_from": train_from}
        self.start = copy.deepcopy(fitted) if train_from == "start" else fitted

    def trial_start(self, store: "FeatureStore") -> tuple[nn.Module, dict]:
        """(the start fitted on the trial's clips, what it chose): from the same random weights, handed
        over (a run keeps no third copy of each head after its trial: a full-width TL-Tr is 160 MB)."""
        head, self.initial = self.initial, None
        if head is None:
            raise RuntimeError("a probe start's trial start is fitted once")
        info = probe_start(head, store, self.trial_idx, self.y[self.trial_idx], self.multilabel,
                           groups_of(self.trial_idx, self.folds, self.y, self.seed))
        return head, info


TRIAL_SEED = 104729  # the trial's generator: seed + this (not the run's, nor --lr auto's)


def trial(start: Start, name: str, s: Setup, opts: TrainOptions, lr: float, weights, world: "World", device,
          autocast) -> dict:
    """What the run keeps for the head of `start` ("kept": "start" or "trained"), decided on its
    training clips only: the start fitted on the trial's clips, and a head trained there as the run
    trains (its epochs, schedule, weight averaging) from what the run trains from (that start, or
    the random weights: `Start.train_from`), both scored on the held-back clips; the start is kept
    only where it scores higher. The same on every rank."""
    store = s.data.store
    rand = copy.deepcopy(start.initial) if start.train_from == "random" else None
    head, info = start.trial_start(store)
    begin = copy.deepcopy(head) if rand is None else head
    fit = Fit(f"{name} trial", head if rand is None else rand, opts, start.trial_idx, None, device, lr=lr)
    first, last = wa_range(opts)
    side_run(fit, s, opts, weights, world, device, autocast, opts.seed + TRIAL_SEED, f"start trial {name} epoch",
             lambda e: fit.accumulate() if first <= e + 1 <= last else None)
    y = start.y[start.held_idx]
    got = {k: score(y, predict(h, store, start.held_idx, start.multilabel, autocast=autocast)[:, :y.shape[1]],
                    start.multilabel)["score"] for k, h in (("start", begin), ("trained", fit.averaged_head()))}
    kept = "start" if got["start"] > got["trained"] else "trained"
    rec = {"kept": kept, "trial_clips": len(start.trial_idx), "held_back": len(start.held_idx),
           "held_back_scores": got, "trial_start": info}
    return from_main(json_safe(rec), world)   # plain numbers (last.pt is loaded with weights_only); rank 0's
