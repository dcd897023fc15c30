"""Files a person reads: CSV tables, summary JSON and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from wat.data.files import pyplot, save_figure, write_csv, write_json


def best_layer_counts(classwise: np.ndarray) -> tuple[np.ndarray, int, int]:
    """classwise [C, L] -> (classes whose best layer each layer is, classes with a tie, classes
    undefined everywhere). A class tied across k layers counts 1/k for each: no layer wins ties."""
    counts = np.zeros(classwise.shape[1])
    ties = undefined = 0
    for row in classwise:
        if np.isnan(row).all():
            undefined += 1
            continue
        best = np.flatnonzero(row == np.nanmax(row))
        counts[best] += 1.0 / len(best)
        ties += len(best) > 1
    return counts, ties, undefined


# ---------------------------------------------------------------- probe outputs

def write_probe(report, out_dir) -> dict:
    """layers.csv, classwise_f1.csv (+ classwise_ap.csv multi-label), fusion.csv, PNGs, summary.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    several = len(report.caches) > 1
    rows = [(r.feature.caches[0], r.feature.layers[0][0], r.score, r.score_std, r.macro_f1)
            for c in range(len(report.caches)) for r in report.layer_results(c)]
    write_csv(out / "layers.csv", ["features", "layer", "score", "score_std", "macro_f1"], rows)

    per_cache = [report.layer_results(c) for c in range(len(report.caches))]
    cols = [(f"c{c}_layer_{r.feature.layers[0][0]}" if several else f"layer_{r.feature.layers[0][0]}", r)
            for c, rs in enumerate(per_cache) for r in rs]
    tables = [("classwise_f1.csv", lambda r: r.classwise_f1)]
    if report.metric == "mAP":
        tables.append(("classwise_ap.csv", lambda r: r.classwise_ap))
    for name, get in tables:
        write_csv(out / name, ["class", "name"] + [c for c, _ in cols],
                  [(k, n, *[get(r)[i] for _, r in cols]) for i, (k, n) in enumerate(zip(report.keys, report.names))])

    fusion = report.fusion_results()
    if fusion:
        write_csv(out / "fusion.csv", ["fusion", "features", "layers", "score", "score_std", "macro_f1"],
                  [(r.feature.kind, "+".join(map(str, r.feature.caches)),
                    ";".join(",".join(map(str, ls)) for ls in r.feature.layers), r.score, r.score_std, r.macro_f1)
                   for r in fusion])

    # best layer per class: AP for multi-label (F1 at 0.5 is degenerate for rare classes), else F1
    hist = []
    for c, rs in enumerate(per_cache):
        mat = np.stack([(r.classwise_ap if report.metric == "mAP" else r.classwise_f1) for r in rs], 1)
        counts, ties, undefined = best_layer_counts(mat)
        hist.append({"features": c, "layers": [r.feature.layers[0][0] for r in rs],
                     "classes_per_layer": [round(float(v), 4) for v in counts],
                     "classes_tied": ties, "classes_undefined": undefined})
    plot_best_layer_hist(hist, out / "best_layer_hist.png",
                         "AP" if report.metric == "mAP" else "F1")
    plot_layers(report, out / "layers.png")

    best = report.best()
    summary = {
        "metric": report.metric, "protocol": report.protocol, "n_folds": report.n_folds,
        "features": report.caches, "eval_features": report.eval_caches, "n_classes": len(report.keys),
        "chance": report.chance,
        "best_layer": {"features": best.feature.caches[0], "layer": best.feature.layers[0][0],
                       "score": best.score, "score_std": best.score_std, "macro_f1": best.macro_f1},
        "layers": [{"features": r[0], "layer": r[1], "score": r[2], "score_std": r[3], "macro_f1": r[4]}
                   for r in rows],
        "fusion": [{"fusion": r.feature.kind, "features": list(r.feature.caches), "score": r.score,
                    "score_std": r.score_std, "macro_f1": r.macro_f1} for r in fusion],
        "best_layer_hist": hist,
        "skipped_classes": report.skipped_classes,
        "files": sorted({p.name for p in out.iterdir() if ".partial" not in p.name} | {"summary.json"}),
    }
    write_json(out / "summary.json", summary)
    return summary


def plot_layers(report, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in range(len(report.caches)):
        rs = report.layer_results(c)
        x = [r.feature.layers[0][0] for r in rs]
        ax.errorbar(x, [r.score for r in rs], yerr=[r.score_std for r in rs], marker="o", capsize=3,
                    label=Path(report.caches[c]).parent.name or f"features {c}")
    for i, r in enumerate(report.fusion_results()):
        ax.axhline(r.score, ls="--", lw=1, color=f"C{i + len(report.caches)}", label=r.feature.name)
    ax.axhline(report.chance, color="grey", lw=1, ls=":", label="chance")
    ax.set_xlabel("encoder layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(report.metric)
    ax.set_title(f"linear probe per layer ({report.protocol})")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_best_layer_hist(hist: list[dict], path, by: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(hist), figsize=(6 * len(hist), 4), squeeze=False)
    for ax, h in zip(axes[0], hist):
        ax.bar([str(l) for l in h["layers"]], h["classes_per_layer"])
        ax.set_xlabel("encoder layer")
        ax.set_ylabel("classes whose best layer it is")
        ax.set_title(f"best layer per class (by {by}), features {h['features']}")
        if h["classes_tied"]:
            ax.text(0.99, 0.98, f"{h['classes_tied']} tied classes split evenly", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------- eval outputs

def plot_confusion(cm: np.ndarray, names, path) -> None:
    plt = pyplot()
    n = len(names)
    size = max(5.0, 0.22 * n)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=max(4, 9 - n // 15))
    ax.set_yticks(range(n), names, fontsize=max(4, 9 - n // 15))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    save_figure(fig, path)
