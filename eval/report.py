"""Files a person reads: CSV tables, summary JSON and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from wat.data.report import figures, page as H
from wat.data.files import make_folder, remove_bare, write_csv, write_json

from . import fusion as fusions


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

def write_probe(report, out_dir, options: dict | None = None, *, relative_depth: bool = False) -> dict:
    """layers.csv, classwise_f1.csv (+ classwise_ap.csv multi-label), fusion.csv, PNGs, summary.json,
    report.html (`options`: the run's options, shown in the report; `relative_depth`: layers.png's x
    is layer / number of layers instead of the layer index)."""
    out = Path(out_dir)
    made = make_folder(out)
    try:
        return _write_probe(report, out, options, relative_depth)
    except BaseException:
        remove_bare(made)  # a write that failed at once (a full disk) leaves no empty folder
        raise


def _write_probe(report, out: Path, options: dict | None, relative_depth: bool) -> dict:
    several = len(report.caches) > 1
    kinds = report.probes   # probe kinds; the first is the primary (headline, best-layer histogram)
    rows = [(kind, r.feature.caches[0], r.feature.layers[0][0], r.score, r.score_std, r.macro_f1)
            for kind in kinds for c in range(len(report.caches)) for r in report.layer_results(c, kind)]
    write_csv(out / "layers.csv", ["probe", "features", "layer", "score", "score_std", "macro_f1"], rows)

    per_cache = [report.layer_results(c) for c in range(len(report.caches))]
    # class-wise tables: every kind's layers, columns prefixed by the kind when there are several
    cols = [(("" if len(kinds) == 1 else f"{kind}_") + (f"c{c}_" if several else "") + f"layer_{r.feature.layers[0][0]}", r)
            for kind in kinds for c in range(len(report.caches)) for r in report.layer_results(c, kind)]
    tables = [("classwise_f1.csv", lambda r: r.classwise_f1)]
    if report.metric == "mAP":
        tables.append(("classwise_ap.csv", lambda r: r.classwise_ap))
    for name, get in tables:
        write_csv(out / name, ["class", "name"] + [c for c, _ in cols],
                  [(k, n, *[get(r)[i] for _, r in cols]) for i, (k, n) in enumerate(zip(report.keys, report.names))])

    fusion = [r for kind in kinds for r in report.fusion_results(kind)]
    labels = figures.distinct_labels(report.metas)
    if fusion:
        write_csv(out / "fusion.csv", ["probe", "fusion", "name", "description", "features", "layers", "score",
                                       "score_std", "macro_f1"],
                  [(r.probe, r.feature.kind, fusion_name(r, report.metas), fusion_text(r, labels),
                    "+".join(map(str, r.feature.caches)),
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
    plot_best_layer_hist(hist, out / "best_layer_hist.png", "AP" if report.metric == "mAP" else "F1", report.metas)
    plot_layers(report, out / "layers.png", relative=relative_depth)

    def best_of(kind):
        b = report.best(kind)
        return {"features": b.feature.caches[0], "layer": b.feature.layers[0][0], "score": b.score,
                "score_std": b.score_std, "macro_f1": b.macro_f1}

    summary = {
        "metric": report.metric, "protocol": report.protocol, "n_folds": report.n_folds,
        "features": report.caches, "eval_features": report.eval_caches, "n_classes": len(report.keys),
        "chance": report.chance, "probes": list(kinds),
        "best_layer": best_of(kinds[0]),                         # of the primary probe kind
        "best_layer_by_probe": {kind: best_of(kind) for kind in kinds},
        "layers": [{"probe": r[0], "features": r[1], "layer": r[2], "score": r[3], "score_std": r[4],
                    "macro_f1": r[5]} for r in rows],
        "fusion": [{"probe": r.probe, "fusion": r.feature.kind, "name": fusion_name(r, report.metas),
                    "description": fusion_text(r, labels), "features": list(r.feature.caches), "score": r.score,
                    "score_std": r.score_std, "macro_f1": r.macro_f1} for r in fusion],
        "models": [{"features": c, "label": labels[c], "code": code, "model": m.model, "layers": list(m.layers),
                    "dim": m.dim, "frames": m.n_frames}
                   for c, (m, code) in enumerate(zip(report.metas, fusions.model_codes(report.metas)))],
        "notes": report.notes,
        "best_layer_hist": hist,
        "skipped_classes": report.skipped_classes,
        "files": sorted({p.name for p in out.iterdir() if ".partial" not in p.name} | {"summary.json", "report.html"}),
    }
    write_json(out / "summary.json", summary)
    probe_html(report, summary, out, options or {})
    return summary


def probe_html(report, summary: dict, out: Path, options: dict) -> Path:
    """report.html of a probe run: headline, figures, per-layer / fusion / per-class tables, caches, options."""
    labels = figures.distinct_labels(report.metas)
    best, several = summary["best_layer"], len(report.caches) > 1
    m = report.metric
    kinds = report.probes
    what = (lambda kind: f"{kind} probe, " if len(kinds) > 1 else "")   # several kinds: cards name theirs
    cards = []
    for kind in kinds:
        b = summary["best_layer_by_probe"][kind]
        cards += [(f"{what(kind)}best layer{' (' + labels[b['features']] + ')' if several else ''}", b["layer"]),
                  (f"{what(kind)}{m} at the best layer", b["score"]), ("± std over folds", b["score_std"]),
                  ("macro-F1 at the best layer", b["macro_f1"])]
        cards += [(what(kind) + _fusion_label(r, labels, report.metas), r.score) for r in report.fusion_results(kind)]
    cards.append((f"chance {m}", report.chance))
    fusion = [r for kind in kinds for r in report.fusion_results(kind)]
    lines, hist = ("one line per probe kind; ", f" ({kinds[0]} probe)") if len(kinds) > 1 else ("", "")
    sections = [H.Section("Headline", H.headline(cards)),
                H.Section("Figures", H.figure(out / "layers.png", f"Probe {m} per encoder layer; {lines}dashed: "
                                              "fusion baselines, dotted: chance.")
                          + H.figure(out / "best_layer_hist.png", f"Best layer per class{hist}; ties split evenly."))]
    sections.append(H.Section(f"Per layer ({report.protocol})", H.table(
        ["probe", "model", "layer", m, "std", "macro-F1"],
        [(kind, labels[c], layer, score, sd, f1) for kind, c, layer, score, sd, f1 in
         ((r["probe"], r["features"], r["layer"], r["score"], r["score_std"], r["macro_f1"]) for r in summary["layers"])])))
    if fusion or report.notes:
        rows = [(r.probe, fusion_name(r, report.metas), fusion_text(r, labels), r.score, r.score_std, r.macro_f1)
                for r in fusion]
        sections.append(H.Section("Fusion baselines", (H.table(["probe", "fusion", "what", m, "std", "macro-F1"], rows)
                                                       if rows else "") + _fusion_notes(report, labels)))
    sections.append(H.Section("Per class", _per_class_probe(report, summary, labels)))
    if report.skipped_classes:
        sections.append(H.Section("Skipped classes", H.paragraph(
            "No positive clip in some test fold (left out of that fold's mAP): "
            + ", ".join(report.names[c] for c in report.skipped_classes))))
    for c, meta in enumerate(report.metas):
        sections.append(H.Section(f"Cache: {labels[c]}", H.key_values(
            H.cache_metadata(meta, report.n_clips, report.caches[c])
            | ({"eval cache": report.eval_caches[c], "eval clips": report.n_eval_clips} if report.eval_caches else {}))))
    sections.append(H.Section("Options", H.key_values(options)))
    sub = (f"{figures.cache_label(report.metas[0], report.n_clips)}; {report.protocol}" if not several else
           f"{', '.join(labels)}; {report.metas[0].dataset}, {report.n_clips} clips; {report.protocol}")
    return H.write_report(out / "report.html", f"wat-probe: {probes_title(kinds)} per layer", sub, sections)


def probes_title(kinds) -> str:
    return "linear probe" if tuple(kinds) == ("linear",) else " / ".join(kinds) + " probes"


def _per_class_probe(report, summary, labels) -> str:
    """Per class: F1 (and AP) at the overall best layer and the class's own best layer(s)."""
    best = summary["best_layer"]
    rs = report.layer_results(best["features"])
    at = next(r for r in rs if r.feature.layers[0][0] == best["layer"])
    by_ap = report.metric == "mAP"
    mat = np.stack([(r.classwise_ap if by_ap else r.classwise_f1) for r in rs], 1)
    layers = [r.feature.layers[0][0] for r in rs]
    rows = []
    for i, (key, name) in enumerate(zip(report.keys, report.names)):
        row = mat[i]
        own = "" if np.isnan(row).all() else ", ".join(str(layers[j]) for j in np.flatnonzero(row == np.nanmax(row)))
        rows.append((name, key, at.classwise_f1[i]) + ((at.classwise_ap[i],) if by_ap else ()) + (own,))
    head = ["class", "key", f"F1 at layer {best['layer']}" + (f" ({report.probes[0]})" if len(report.probes) > 1 else "")] + ([f"AP at layer {best['layer']}"] if by_ap else []) \
        + [f"best layer(s) by {'AP' if by_ap else 'F1'}" + (f" ({labels[best['features']]})" if len(labels) > 1 else "")]
    return H.table(head, rows)


def fusion_name(r, metas) -> str:
    """The HEAR seed's name of a fusion result (`wat.eval.fusion.fusion_name`)."""
    return fusions.fusion_name(r.feature.kind, r.feature.caches, r.feature.fused, metas)


def fusion_text(r, labels) -> str:
    return fusions.describe(r.feature.kind, r.feature.caches, r.feature.fused, labels)


def _fusion_label(r, labels, metas=None) -> str:
    """Headline and legend label: the description when one model is probed, else the seed's short
    name (the caption and the report's table say what each is)."""
    if len(labels) > 1 and metas is not None:
        return fusion_name(r, metas)
    return fusion_text(r, labels)


def _fusion_notes(report, labels) -> str:
    codes = fusions.model_codes(report.metas)
    lines = [f"Letters in the names: {'; '.join(f'{c} = {l}' for c, l in zip(codes, labels))}."] \
        if len(labels) > 1 else []
    return "".join(H.paragraph(t) for t in lines + report.notes)


def _cross_names(fusion, metas) -> str:
    """The caption's key to the seed's names of the fusions drawn when several models are probed."""
    if len(metas) < 2 or not fusion:
        return ""
    codes, labels = fusions.model_codes(metas), figures.distinct_labels(metas)
    what = "; ".join(f"{fusion_name(r, metas)}: {fusion_text(r, codes)}" for r in fusion)
    return f" Fusions: {what} ({', '.join(f'{c} = {l}' for c, l in zip(codes, labels))})."


_MARKERS = ("o", "s", "^", "D", "v", "P")   # per probe kind
_KIND_LS = ("-", "--", ":", "-.")


def plot_layers(report, path, *, relative: bool = False) -> dict:
    """Probe score per encoder layer, one line per cache (model, labelled from its metadata), like the
    Whisper-AT paper's figure 1 (lower); fusion baselines and chance as labelled reference lines.
    x: the layer index, as the paper; `relative`: layer / number of layers, which puts encoders of
    different depth on one axis."""
    metas = report.metas
    labels = figures.distinct_labels(metas)
    kinds = report.probes
    fig, axes = figures.figure(width=figures.COLUMN, height=2.4 + 0.15 * (len(kinds) - 1))
    ax = axes[0, 0]
    values = []
    for j, kind in enumerate(kinds):     # one line per model and probe kind
        for c, m in enumerate(metas):
            rs = report.layer_results(c, kind)
            layer = np.array([r.feature.layers[0][0] for r in rs], float)
            x = (layer + 1) / m.n_layers if relative else layer
            y = np.array([r.score for r in rs])
            sd = np.array([r.score_std for r in rs])
            # several kinds: one model gets a colour per kind; several models a colour per model, a style per kind
            style = {} if len(kinds) == 1 else dict(color=figures.COLORS[(j if len(metas) == 1 else c) % 8],
                                                    ls="-" if len(metas) == 1 else _KIND_LS[j % len(_KIND_LS)])
            name = labels[c] if len(kinds) == 1 else (f"{kind} probe" if len(metas) == 1 else f"{labels[c]}, {kind}")
            line, = ax.plot(x, y, marker=_MARKERS[j % len(_MARKERS)], label=name, **style)
            if report.n_folds > 1:
                ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.18 / len(kinds), lw=0)
            values += [y - sd, y + sd]
    fusion = [r for kind in kinds for r in report.fusion_results(kind)]
    values += [[r.score for r in fusion]]
    ax.set_ylim(*figures.data_limits(np.concatenate([np.ravel(v) for v in values]), bounds=(0, 1)))
    for r in fusion:
        if len(kinds) > 1 and len(metas) == 1:   # several kinds: a kind's baselines in its line's colour
            color = figures.COLORS[kinds.index(r.probe) % 8]
        elif len(metas) == 1:    # one model: the baselines get colours of their own
            color = figures.COLORS[1 if r.feature.kind == "mean" else 2]
        else:                    # several: a model's own baselines in its colour, cross-model ones black
            color = figures.COLORS[r.feature.caches[0] % 8] if len(r.feature.caches) == 1 else "#000000"
        figures.reference_line(ax, r.score, (f"{r.probe}, " if len(kinds) > 1 else "") + _fusion_label(r, labels, metas),
                               color=color, ls="--" if r.feature.kind == "mean" else "-.")
    figures.reference_line(ax, report.chance, "chance")
    if relative:
        ax.set_xlabel("relative depth (layer / number of layers)")
    else:
        ax.set_xlabel("encoder layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"probe {report.metric}")
    m = metas[0]
    data = (figures.cache_label(m, report.n_clips) if len(metas) == 1
            else f"{m.dataset}: {len(m.vocab)} classes, {report.n_clips} clips")
    figures.title(ax, f"{probes_title(kinds)[0].upper()}{probes_title(kinds)[1:]} per layer", data)
    figures.legend_below(ax, ncol=2 if max(map(len, labels)) <= 24 else 1)
    figures.caption(fig, f"{report.protocol}" + (f"; shaded: ±1 standard deviation over the {report.n_folds} folds."
                                                 if report.n_folds > 1 else ".") + _cross_names(fusion, metas))
    return figures.save(fig, path)


def plot_best_layer_hist(hist: list[dict], path, by: str, metas) -> dict:
    """Figure 3 of the paper: for each class, the layer whose probe scores it best."""
    labels = figures.distinct_labels(metas)
    n = len(hist)
    fig, axes = figures.figure(1, n, width=min(figures.PAGE, figures.COLUMN * n), height=2.2)
    for ax, h in zip(axes[0], hist):
        ax.bar([str(l) for l in h["layers"]], h["classes_per_layer"], color=figures.COLORS[h["features"] % 8])
        ax.set_xlabel("encoder layer")
        ax.set_ylabel("classes")
        ax.grid(axis="x", visible=False)
        figures.title(ax, f"Best probe layer per class (by {by})", labels[h["features"]])
        ax.set_ylim(0, max(1.0, max(h["classes_per_layer"], default=0) * 1.12))
    tied = sum(h["classes_tied"] for h in hist)
    undefined = [h["classes_undefined"] for h in hist]
    text = (f"Each class counts once, at the layer with its highest probe {by}; a class tied across k layers "
            f"adds 1/k to each of them ({tied} tied class{'es' if tied != 1 else ''}"
            + (f" in {n} models" if n > 1 else "") + ")")
    if any(undefined):
        text += f"; {max(undefined)} class(es) without a defined {by} are left out"
    figures.caption(fig, f"{text}. {figures.cache_label(metas[0])}.")
    return figures.save(fig, path)


# ---------------------------------------------------------------- eval outputs

def plot_confusion(cm: np.ndarray, names, path, title=()) -> dict:
    n = len(names)
    size = max(figures.COLUMN, 0.13 * n + 1.4)   # 8 pt tick labels need ~0.13 in per class
    fig, axes = figures.figure(width=size + 0.6, height=size)
    ax = axes[0, 0]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    figures.title(ax, *title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    return figures.save(fig, path)


def plot_per_class(values, names, path, *, metric: str, overall: float | None, title=(), show: int = 30) -> dict:
    """Per-class scores as a dot plot, best first (all classes up to `show`, else the best and the
    worst show/2), with the class mean as a labelled reference."""
    vals = np.array([np.nan if v is None else v for v in values], float)
    order = [i for i in np.argsort(-np.nan_to_num(vals, nan=-np.inf), kind="stable") if np.isfinite(vals[i])]
    if not order:
        raise figures.FigureError(f"no class has a {metric}")
    cut = len(order) > show
    pick = order[:show // 2] + order[-(show // 2):] if cut else order
    fig, axes = figures.figure(width=figures.COLUMN, height=0.13 * len(pick) + 1.1)
    ax = axes[0, 0]
    y = np.arange(len(pick))[::-1].astype(float)
    if cut:
        y[show // 2:] -= 1.0   # a visible gap where the middle classes are left out
    ax.plot(vals[pick], y, "o", color=figures.COLORS[0])
    ax.set_yticks(y, [names[i] for i in pick])
    ax.set_xlim(*figures.data_limits(np.r_[vals[pick], [overall] if overall is not None else []], bounds=(0, 1)))
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(metric)
    if overall is not None:
        ax.axvline(overall, color=figures.REFERENCE, ls="--", lw=1.0, label=f"mean over classes {overall:.3g}")
        figures.legend_below(ax, ncol=1)
    figures.title(ax, *title, f"best and worst {show // 2} of {len(order)} classes" if cut else "")
    return figures.save(fig, path)


def eval_html(result: dict, out: Path, *, meta, info, options: dict, per_class_rows, per_class_header) -> Path:
    """report.html of a head evaluation: headline, figures, per-class table, cache, head, options."""
    m = result["metric"]
    cards = [("clips", result["n_clips"])]
    if result.get("accuracy") is not None:
        cards += [("accuracy", result["accuracy"]), (f"top-{result['top_k']} accuracy", result["top_k_accuracy"]),
                  ("macro-F1", result.get("macro_f1"))]
    cards += [("mAP", result["mAP"]), ("mAUC", result["mAUC"]), ("d'", result["d_prime"])]
    if "decisions" in result:
        d = result["decisions"]
        cards += [("macro-F1 at thresholds", d["macro_f1"]), ("micro-F1 at thresholds", d["micro_f1"])]
    figs = "".join(H.figure(out / name, cap) for name, cap in (
        ("per_class.png", f"Per-class {'AP' if m == 'mAP' else 'F1'}, best first; dashed: the mean over classes."),
        ("confusion.png", "Confusion matrix, rows normalised to the true class.")) if (out / name).exists())
    sections = [H.Section("Headline", H.headline(cards)), H.Section("Figures", figs),
                H.Section("Per class", H.table(per_class_header, per_class_rows))]
    if result["skipped_classes"]:
        sections.append(H.Section("Skipped classes", H.paragraph(
            "No positive clip in the eval set (left out of mAP/mAUC): " + ", ".join(result["skipped_class_names"]))))
    if "decisions" in result:
        sections.append(H.Section("Decisions", H.key_values({"thresholds": result["decisions"]["thresholds"],
                                                             **result.get("tuning", {})})))
    sections += [H.Section("Cache", H.key_values(H.cache_metadata(meta, result["n_clips"], result["features"]))),
                 H.Section("Head", H.key_values(
                     {"file": result["head"], "kind": info.kind, "projection width": info.proj_dim or "none",
                      "outputs": info.n_classes, "trained on": f"{info.model or '?'} ({info.policy})",
                      "multi-label": info.multilabel})),
                 H.Section("Options", H.key_values(options))]
    sub = f"{info.kind} head on {figures.cache_label(meta, result['n_clips'])}"
    return H.write_report(out / "report.html", "wat-eval: head evaluation", sub, sections)
