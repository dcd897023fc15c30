"""What a run leaves for people: metrics.json (rewritten after every epoch), per_class.csv and
curves.png, all written atomically."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from wat.data.files import pyplot, save_figure, write_csv, write_json
from wat.data.heads import HeadInfo, n_parameters

from .options import TrainOptions, milestones, wa_range


def write_metrics(out: Path, opts: TrainOptions, info: HeadInfo, head, history: list[dict], best: dict,
                  final: dict | None) -> None:
    d = {"options": {k: v for k, v in dataclasses.asdict(opts).items()},
         "head": {"kind": info.kind, "dim": info.dim, "n_parameters": n_parameters(head),
                  "n_classes": info.n_classes, "primary_classes": info.primary_classes},
         "cache": {"model": info.model, "fingerprint": info.fingerprint, "policy": info.policy,
                   "n_layers": info.n_layers, "dim": info.dim_in},
         "lr_milestones": milestones(opts.epochs), "weight_average": list(wa_range(opts)),
         "epochs": history, "best": best, "final": final}
    write_json(out / "metrics.json", d)


def write_per_class(path: Path, names, values, support, multilabel: bool) -> None:
    write_csv(path, ["name", "AP" if multilabel else "F1", "support"],
              [(name, "" if v is None else f"{v:.6f}", int(n)) for name, v, n in zip(names, values, support)])


def plot_curves(out: Path, history: list[dict], per_fold: bool, metric: str) -> None:
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], marker=".")
    a.set(xlabel="epoch", ylabel="train loss")
    if any("score" in h for h in history):
        b.plot(ep, [h.get("score", np.nan) for h in history], marker=".", label="mean" if per_fold else "eval")
        if per_fold:
            for name in history[0]["folds"]:
                b.plot(ep, [h["folds"][name].get("score", np.nan) for h in history], alpha=0.4, label=name)
        b.legend()
    b.set(xlabel="epoch", ylabel=f"held-out {metric}")
    fig.tight_layout()
    save_figure(fig, out / "curves.png")
