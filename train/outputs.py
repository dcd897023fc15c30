"""What a run leaves for people: metrics.json (rewritten after every epoch), per_class.csv,
curves.png and report.html, all written atomically."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from wat.data.report import figures, page as H
from wat.data.files import write_csv, write_json
from wat.data.heads import HeadInfo, n_parameters
from wat.data.labels import Vocabulary
from wat.eval import metrics

from .options import TrainOptions, milestones, wa_range


def write_metrics(out: Path, opts: TrainOptions, info: HeadInfo, head, history: list[dict], best: dict,
                  final: dict | None, lr: dict | None = None, processes: int = 1) -> dict:
    """`lr`: where each head's learning rate came from (--lr, the kind's default, the --lr auto search);
    `processes`: how many processes trained the run (torchrun's WORLD_SIZE; 1 without it)."""
    d = {"options": {k: v for k, v in dataclasses.asdict(opts).items()}, "processes": processes,
         "head": {"kind": info.kind, "proj_dim": info.proj_dim, "n_parameters": n_parameters(head),
                  "n_classes": info.n_classes, "primary_classes": info.primary_classes},
         "cache": {"model": info.model, "fingerprint": info.fingerprint, "policy": info.policy,
                   "n_layers": info.n_layers, "dim": info.dim_in},
         "lr_milestones": milestones(opts.epochs), "weight_average": list(wa_range(opts)),
         "lr": lr, "epochs": history, "best": best, "final": final}
    write_json(out / "metrics.json", d)
    return d


def write_per_class(path: Path, vocab: Vocabulary, scores: metrics.Scores, support) -> None:
    """wat-eval's per-class columns (metrics.per_class_table), rows in class order."""
    write_csv(path, *metrics.per_class_table(vocab.keys, vocab.names, scores, support, ranked=False))


def plot_curves(out: Path, history: list[dict], per_fold: bool, metric: str, *, title=(), chance=None,
                wa=None, wa_epochs=None, best_epoch=None) -> dict:
    """curves.png: training loss, and the held-out score per epoch (the fold mean bold, each fold
    thin), the chosen epoch, the averaging window, the weight-averaged head and chance."""
    ep = np.array([h["epoch"] for h in history])
    scored = any(h.get("score") is not None for h in history)
    folds = list(history[0].get("folds", {})) if per_fold else []
    fig, axes = figures.figure(2 if scored else 1, 1, width=figures.COLUMN, height=4.4 if scored else 2.3,
                               sharex=True)
    a = axes[0, 0]
    losses = [[h["train_loss"] for h in history]]
    for i, name in enumerate(folds):
        losses.append([h["folds"][name]["train_loss"] for h in history])
        a.plot(ep, losses[-1], color=figures.REFERENCE, lw=0.6, alpha=0.6, label=f"{len(folds)} folds" if i == 0 else None)
    a.plot(ep, losses[0], color=figures.COLORS[0], label="mean over folds" if folds else None)
    a.set_ylim(*figures.data_limits(losses, bounds=(0, None)))
    a.set_ylabel("training loss")
    figures.title(a, *title)
    bottom = axes[-1, 0]
    bottom.set_xlabel("epoch")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    if folds and not scored:
        figures.legend_below(a, ncol=2)
    if scored:
        b = axes[1, 0]
        values = [[h.get("score", np.nan) for h in history]]
        for i, name in enumerate(folds):
            values.append([h["folds"][name].get("score", np.nan) for h in history])
            b.plot(ep, values[-1], color=figures.REFERENCE, lw=0.6, alpha=0.6, label=f"{len(folds)} folds" if i == 0 else None)
        b.plot(ep, values[0], color=figures.COLORS[0], label="mean over folds" if folds else "held-out")
        running = [h.get("score_wa", np.nan) for h in history]
        if np.isfinite(np.asarray(running, float)).any():
            b.plot(ep, running, color=figures.COLORS[1], ls="--", label="running weight average")
            values.append(running)
        b.set_ylim(*figures.data_limits(values + [[wa if wa is not None else np.nan]], bounds=(0, 1)))
        if wa_epochs:
            b.axvspan(wa_epochs[0] - 0.5, wa_epochs[1] + 0.5, color="#000000", alpha=0.06, lw=0,
                      label=f"averaged epochs {wa_epochs[0]}-{wa_epochs[1]}")
        if best_epoch:
            v = values[0][best_epoch - 1]
            b.plot([best_epoch], [v], "*", color=figures.COLORS[0], ms=8, label=f"chosen epoch {best_epoch}: {v:.3g}")
        figures.reference_line(b, wa, "weight-averaged head", color=figures.COLORS[1], ls="-.")
        figures.reference_line(b, chance, "chance")
        b.set_ylabel(f"held-out {metric}")
        figures.legend_below(b, ncol=2)
    return figures.save(fig, out / "curves.png")


def write_report(out: Path, metrics: dict, meta, n_clips: int, *, protocol: str, chance: float | None = None,
                 per_class=None, eval_meta=None, eval_clips: int | None = None) -> Path:
    """report.html of a training run: headline, curves, per-fold / per-class / per-epoch tables,
    cache, head, options. `metrics` is what metrics.json holds; `per_class` (names, values, support)."""
    final, opts, head = metrics["final"] or {}, metrics["options"], metrics["head"]
    m = final.get("metric", "score")
    cards = [("chosen epoch", final.get("best_epoch"))]
    if "best" in final:
        cards += [(f"{m} at the chosen epoch" + (" (fold mean)" if "folds" in final else ""), final["best"]),
                  ("weight-averaged head" + (" (fold mean)" if "folds" in final else ""), final.get("wa"))]
        if "pooled_heldout" in final:
            cards.append((f"{m}, held-out folds pooled", final["pooled_heldout"]))
        cards += [(k, final[v]) for k, v in (("mAUC", "mAUC"), ("d'", "d_prime")) if final.get(v) is not None]
    if chance is not None:
        cards.append((f"chance {m}", chance))
    cards.append(("head parameters", head["n_parameters"]))
    sections = [H.Section("Headline", H.headline(cards)),
                H.Section("Figures", H.figure(out / "curves.png", "Training loss and held-out score per epoch."))]
    if "folds" in final:
        sections.append(H.Section("Per fold", H.table(
            ["fold", f"{m} at the chosen epoch", f"{m} of the weight-averaged head"],
            [(name, f["best"], f["wa"]) for name, f in final["folds"].items()])))
    if per_class is not None:
        names, values, support = per_class
        sections.append(H.Section(f"Per class ({'AP' if m == 'mAP' else 'F1'} at the chosen epoch)", H.table(
            ["class", "AP" if m == "mAP" else "F1", "support"], list(zip(names, values, [int(s) for s in support])))))
    hist = metrics["epochs"]
    folds = list(hist[0].get("folds", {})) if hist else []
    wa_col = any(h.get("score_wa") is not None for h in hist)
    sections.append(H.Section("Per epoch", H.table(
        ["epoch", "lr", "training loss", m] + (["running weight average"] if wa_col else []) + folds,
        [(h["epoch"], h["lr"], h["train_loss"], h.get("score")) + ((h.get("score_wa"),) if wa_col else ())
         + tuple(h["folds"][f].get("score") for f in folds) for h in hist])))
    sections.append(H.Section("Training cache", H.key_values(H.cache_metadata(meta, n_clips, opts["features"]))))
    if eval_meta is not None:
        sections.append(H.Section("Evaluation cache", H.key_values(
            H.cache_metadata(eval_meta, eval_clips, opts["eval_features"]))))
    sections += [H.Section("Head", H.key_values({**head, "weight-averaged epochs": metrics["weight_average"],
                                                 "lr milestones": metrics["lr_milestones"]})),
                 H.Section("Options", H.key_values(opts))]
    return H.write_report(out / "report.html", "wat-train: training run",
                          f"{head['kind']} head on {figures.cache_label(meta, n_clips)}; {protocol}", sections)
