"""wat-robust's outputs: the probes (wat-probe's machinery on the caches the run wrote), wer.csv,
the three figures of the paper's section 3 in wat's one figure style (wat.data.report.figures: labels from
the caches' own metadata, axes scaled to the data), summary.json and a self-contained report.html
(wat.data.report.page)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from wat.data.report import figures, page as H
from wat.data.cache import open_cache
from wat.data.files import write_csv, write_json

WER_COLUMNS = ("model", "snr", "noise_class", "utterances", "words", "errors", "wer")
Y_CAP = 50.0     # WER increase (points) above which the paper lists classes apart (figure 2)
NAMED = 12       # figure 2 names every class up to this many; beyond, the extremes only


def _probe(path, layers, options) -> tuple[object | None, str | None]:
    """(ProbeReport, None) or (None, why it could not be probed)."""
    from wat.eval.probe import ProbeError, ProbeOptions, probe

    try:
        return probe([str(path)], opts=ProbeOptions(layers=layers, fusion=(), jobs=options.jobs,
                                                   seed=options.seed)), None
    except (ProbeError, ValueError) as e:  # e.g. too few clips of a class for any fold to train on
        return None, " ".join(str(e).split())


def classwise_points(rows: list[dict], model: str, names, f1: np.ndarray) -> list[dict]:
    """Per noise class: x = last-layer probe F1 on the noise alone, y = WER increase (points) from the
    highest to the lowest SNR; only classes scored at both SNRs."""
    mine = [r for r in rows if r["model"] == model and r["noise_class"] != "all" and r["words"] > 0]
    if not mine:
        return []
    hi, lo = max(r["snr"] for r in mine), min(r["snr"] for r in mine)
    at = {(r["snr"], r["noise_class"]): r["wer"] for r in mine}
    out = []
    for k, name in enumerate(names):
        if (hi, name) in at and (lo, name) in at and np.isfinite(f1[k]):
            out.append({"class": name, "f1": float(f1[k]), "wer_increase": 100.0 * (at[(lo, name)] - at[(hi, name)]),
                        "wer_high_snr": at[(hi, name)], "wer_low_snr": at[(lo, name)]})
    return out


def correlation(points: list[dict]) -> dict:
    """Pearson r and its two-sided p-value (scipy.stats.pearsonr), and the least-squares line."""
    from scipy.stats import pearsonr

    x = np.array([p["f1"] for p in points], float)
    y = np.array([p["wer_increase"] for p in points], float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson_r": None, "p_value": None, "slope": None, "intercept": None, "n_classes": len(x),
                "note": "needs at least 3 classes with varying F1 and WER increase"}
    r, p = pearsonr(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    return {"pearson_r": float(r), "p_value": float(p), "slope": float(slope), "intercept": float(intercept),
            "n_classes": len(x)}


def y_cap(y: np.ndarray) -> float | None:
    """The paper's figure 2 ends its y-axis at +50 points and lists the classes above apart; when
    most classes lie above, a cut would hide the figure's point, so every class is drawn (None)."""
    return Y_CAP if len(y) and (y <= Y_CAP).mean() >= 0.5 else None


# ---------------------------------------------------------------- figures (one panel per model)
# `panels`: one dict per model, in the order of --model, with `meta` (the mixture cache's
# CacheMeta: the labels come from it, never from a folder name) and what the figure draws.

def _labels(panels) -> list[str]:
    return figures.distinct_labels([p["meta"] for p in panels])


def plot_wer_vs_snr(panels: list[dict], data: str, path) -> dict:
    """Figure 1 (upper): corpus WER per SNR, one line per model, clean speech on the left."""
    fig, axes = figures.figure(width=figures.COLUMN, height=2.3)
    ax = axes[0, 0]
    values, snrs, counts = [], set(), set()
    for p, label in zip(panels, _labels(panels)):
        pts = sorted(p["wer"], reverse=True)                       # (snr, wer, mixtures scored)
        ax.plot([s for s, _, _ in pts], [100 * w for _, w, _ in pts], marker="o", label=label)
        values.append([100 * w for _, w, _ in pts])
        snrs |= {s for s, _, _ in pts}
        counts |= {n for _, _, n in pts}
    ax.set_ylim(*figures.data_limits(values, bounds=(0, None), min_span=2.0))
    ax.set_xticks(sorted(snrs), [f"{s:+g}" for s in sorted(snrs)])
    pad = 0.06 * (max(snrs) - min(snrs))
    ax.set_xlim(max(snrs) + pad, min(snrs) - pad)                  # inverted: clean on the left, as in the paper
    ax.set_xlabel("SNR of the background sound (dB)")
    ax.set_ylabel("WER (%)")
    figures.title(ax, "WER of speech under background sounds", data)
    figures.legend_below(ax, ncol=2)
    n = f"{min(counts)}" if len(counts) == 1 else f"{min(counts)}-{max(counts)}"
    figures.caption(fig, f"Corpus WER (all errors / all reference words) over {n} mixtures per SNR and model; "
                         "SNR over the whole utterance.")
    return figures.save(fig, path)


def plot_classwise(panels: list[dict], snrs: tuple[float, float], data: str, path) -> dict:
    """Figure 2: per noise class, the last-layer probe F1 on the noise clips alone (x) against the WER
    increase from the highest to the lowest SNR (y); least-squares line, Pearson r and p in the title,
    classes beyond the y-range listed under the figure."""
    n = len(panels)
    fig, axes = figures.figure(1, n, width=min(figures.PAGE, figures.COLUMN * n), height=2.7)
    fig.subplots_adjust(wspace=0.45)    # room for the next panel's y label
    notes = []
    for ax, p, label in zip(axes[0], panels, _labels(panels)):
        pts, corr = p["points"], p["correlation"]
        x = np.array([q["f1"] for q in pts], float)
        y = np.array([q["wer_increase"] for q in pts], float)
        cap = y_cap(y)
        inside = y <= cap if cap is not None else np.ones(len(y), bool)
        if inside.any():
            ax.scatter(x[inside], y[inside], s=9, color=figures.COLORS[0], zorder=3)
            ax.set_ylim(*figures.data_limits(y[inside], min_span=5.0))
            ax.set_xlim(*figures.data_limits(x, bounds=(0, 1), min_span=0.1))
            order = [i for i in np.argsort(-y, kind="stable") if inside[i]]
            named = order if len(order) <= NAMED else order[:NAMED // 2] + order[-(NAMED // 2):]
            for i in named:
                ax.annotate(pts[i]["class"], (x[i], y[i]), xytext=(2, 1.5), textcoords="offset points",
                            fontsize=figures.FONT_PT - 1.5, color="#333333")
            if len(named) < len(order):
                notes.append(f"{label}: named are the {NAMED // 2} largest and smallest increases in range")
        if corr["slope"] is not None:
            xs = np.array([x.min(), x.max()])
            ax.plot(xs, corr["slope"] * xs + corr["intercept"], color=figures.COLORS[1], lw=1.0, zorder=2,
                    label="least-squares line")
            stat = f"Pearson r = {corr['pearson_r']:.2f}, p = {corr['p_value']:.2g}"
        else:
            stat = "correlation undefined"
        figures.title(ax, f"{label}, {corr['n_classes']} classes: {stat}")
        ax.set_xlabel("noise-class F1, last-layer probe on the noise alone")
        ax.set_ylabel(f"WER increase {snrs[0]:+g} to {snrs[1]:+g} dB (points)")
        beyond = sorted((q for q, keep in zip(pts, inside) if not keep), key=lambda q: -q["wer_increase"])
        if beyond:
            notes.append(f"{label}, above +{cap:g} points (not drawn; in the line and r): "
                         + ", ".join(f"{q['class']} +{q['wer_increase']:.0f}" for q in beyond))
        if p["missing"]:
            notes.append(f"{label}: {p['missing']} class(es) without a WER at both SNRs or a probe F1 left out")
    figures.caption(fig, ". ".join([data] + notes) + ".")
    return figures.save(fig, path)


def plot_layers(panels: list[dict], data: str, path) -> dict:
    """Per model: the linear probe's accuracy of the noise class per encoder layer on the noisy speech,
    one line per SNR (paper figure 1, lower, on this run's mixtures); chance as a reference line and
    the last-layer probe on the noise clips alone as a marker."""
    n = len(panels)
    fig, axes = figures.figure(1, n, width=min(figures.PAGE, figures.COLUMN * n), height=2.4)
    fig.subplots_adjust(wspace=0.45)    # room for the next panel's y label
    notes = []
    for ax, p, label in zip(axes[0], panels, _labels(panels)):
        values = []
        for snr, (layers, scores, _) in sorted(p["layers"].items(), reverse=True):
            ax.plot(layers, scores, marker="o", label=f"{snr:+g} dB")
            values.append(scores)
        if values:
            ax.set_ylim(*figures.data_limits(values, bounds=(0, 1)))
            figures.reference_line(ax, p.get("chance"), "chance")
            if p.get("noise_alone") is not None:   # what the last layer reaches without the speech
                figures.reference_line(ax, p["noise_alone"][1], f"noise alone (layer {p['noise_alone'][0]})",
                                       color="#000000", ls="--")
        ax.set_xlabel("encoder layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("noise-class probe accuracy")
        figures.title(ax, f"Background sound per layer: {label}", data)
        figures.legend_below(ax, ncol=2)
        if p["not_probed"]:
            notes.append(f"{label}, not probed: " + "; ".join(f"{s:+g} dB: {why[:120]}"
                                                              for s, why in p["not_probed"].items()))
    counts = sorted({c for p in panels for c in p["clips"].values()})
    protocol = next((p["protocol"] for p in panels if p["protocol"]), None)
    text = (f"Linear probe, {protocol}, on the {'/'.join(map(str, counts))} mixtures of each SNR (labels: the "
            "noise class)." if protocol else "No SNR had enough mixtures per class to probe.")
    figures.caption(fig, " ".join([text] + [f"{x}." for x in notes]))
    return figures.save(fig, path)


# ---------------------------------------------------------------- the run's outputs

def _finite(v):
    return v if v is not None and not (isinstance(v, float) and math.isnan(v)) else None


def data_label(speech: str, utterances: int, noise_meta) -> str:
    """What was mixed, for figure titles, from the noise cache's metadata, the speech kind and the
    utterances decoded: `esc50 noise, librispeech speech: 11 classes, 10 utterances`."""
    return f"{noise_meta.dataset} noise, {speech} speech: {len(noise_meta.vocab)} classes, {utterances} utterances"


def decoded_utterances(run: dict) -> set[str]:
    """The ids of the utterances with at least one mixture decoded and scored in `run` (an
    utterance whose audio fails, or whose every mixture fails, has none)."""
    return {row["utterance"] for r in run["records"] for row in r["rows"]}


def write_report(out: Path, plan, runs: list[dict], rows: list[dict], problems, options) -> dict:
    out = Path(out)
    write_csv(out / "wer.csv", WER_COLUMNS, [[r[k] for k in WER_COLUMNS] for r in rows])
    names = plan.noise.vocab.names
    snrs = sorted({r["snr"] for r in rows}, reverse=True)
    panels, models = [], {}
    for run in runs:
        m = run["name"]
        mix_cache, noise_cache = open_cache(run["index"]), open_cache(run["noise_index"])
        noise_rep, noise_why = _probe(run["noise_index"], [run["n_layers"] - 1], options)
        f1 = noise_rep.results[0].classwise_f1 if noise_rep else np.full(len(names), np.nan)
        points = classwise_points(rows, m, names, f1)
        corr = correlation(points)
        if noise_why:
            corr["note"] = f"noise-alone probe failed: {noise_why}"
        per_snr, why_layers, chance, protocol, clips = {}, {}, None, "", {}
        for snr, path in run["per_snr"].items():
            clips[snr] = len(open_cache(path))
            rep, why = _probe(path, None, options)
            if rep is None:
                why_layers[snr] = why
                continue
            rs = rep.layer_results(0)
            per_snr[snr] = ([r.feature.layers[0][0] for r in rs], [r.score for r in rs], [r.score_std for r in rs])
            chance, protocol = rep.chance, rep.protocol
        overall = {r["snr"]: r for r in rows if r["model"] == m and r["noise_class"] == "all"}
        panels.append({"meta": mix_cache.meta, "noise_meta": noise_cache.meta, "n_mixtures": len(mix_cache),
                       "n_noise": len(noise_cache), "name": m,
                       "wer": [(s, r["wer"], r["utterances"]) for s, r in overall.items() if _finite(r["wer"]) is not None],
                       "points": points, "correlation": corr, "missing": len(names) - len(points),
                       "layers": per_snr, "chance": chance, "not_probed": why_layers, "protocol": protocol,
                       "clips": clips, "noise_alone": (run["n_layers"] - 1, noise_rep.results[0].score)
                       if noise_rep else None})
        models[m] = {
            "dir": str(run["dir"].relative_to(out)),
            "recognizer": {"whisper": "whisper.decode, temperature 0, without timestamps",
                           "ctc": "greedy CTC (argmax per frame) through the checkpoint's tokenizer"}[run.get("asr", "whisper")],
            "classwise_figure": str((run["dir"] / "classwise.png").relative_to(out)),
            "features": str(run["index"].relative_to(out)),
            "features_per_snr": {f"{s:+g}": str(p.relative_to(out)) for s, p in run["per_snr"].items()},
            "noise_features": str(run["noise_index"].relative_to(out)),
            "wer": {f"{s:+g}": _finite(overall[s]["wer"]) if s in overall else None for s in snrs},
            "utterances_scored": len(decoded_utterances(run)),
            "mixtures_scored": sum(len(r["rows"]) for r in run["records"]),
            "mixtures_skipped": sum(len(r["errors"]) for r in run["records"]),
            # each mixture's audio went through the encoder once per 30 s window, transcript and features alike
            "encoder_passes": sum(row["encoder_passes"] for r in run["records"] for row in r["rows"]),
            "noise_probe": {"last_layer": run["n_layers"] - 1,
                            "accuracy": noise_rep.results[0].score if noise_rep else None,
                            "error": noise_why},
            "classwise": {**corr, "classes": points},
            "layers": {f"{s:+g}": {"layers": v[0], "accuracy": v[1], "accuracy_std": v[2]} for s, v in per_snr.items()},
            "layers_chance": chance,
            "layers_not_probed": {f"{s:+g}": why for s, why in why_layers.items()},
        }
    decoded = set().union(*map(decoded_utterances, runs))
    failed = [u.id for u in plan.speech.utterances if u.id not in decoded]   # why: problems.tsv
    data = data_label(plan.speech.name, len(decoded), panels[0]["noise_meta"])
    plot_wer_vs_snr(panels, data, out / "wer_vs_snr.png")
    plot_classwise(panels, (snrs[0], snrs[-1]), data, out / "classwise.png")
    for p, run in zip(panels, runs):   # one figure per model too, beside its caches
        plot_classwise([p], (snrs[0], snrs[-1]), data, run["dir"] / "classwise.png")
    plot_layers(panels, data, out / "layers.png")
    summary = {
        # utterances: decoded and scored by at least one model (planned = utterances + failed)
        "speech": {"kind": plan.speech.name, "utterances": len(decoded),
                   "utterances_planned": len(plan.speech.utterances), "utterances_failed": failed},
        "noise": {"dataset": plan.noise.name, "clips": len(plan.noise.clips), "classes": len(names)},
        "snrs": snrs, "noise_per_utterance": options.noise_per_utterance, "seed": options.seed,
        "mixtures_per_model": len(plan.mixtures), "models": models, "problems": len(problems),
        "snr_definition": "10 log10(mean(speech^2) / mean(noise^2)) over the whole utterance",
        "wer_definition": "corpus level: sum(S+D+I) / sum(reference words), after EnglishTextNormalizer",
        "files": ["wer.csv", "wer_vs_snr.png", "classwise.png", "layers.png", "problems.tsv", "summary.json",
                  "report.html"],
    }
    write_json(out / "summary.json", summary)
    robust_html(out, summary, rows, panels, problems, options)
    return summary


def speech_line(speech: dict) -> str:
    """`3 utterances decoded of 5 (2 failed, see problems.tsv: a, b)` from the summary's "speech"."""
    failed = speech["utterances_failed"]
    line = f"{speech['utterances']} utterances decoded of {speech['utterances_planned']}"
    if failed:
        line += (f" ({len(failed)} failed, see problems.tsv: {', '.join(failed[:5])}"
                 f"{', ...' if len(failed) > 5 else ''})")
    return line


# ---------------------------------------------------------------- report.html

def robust_html(out: Path, summary: dict, rows: list[dict], panels: list[dict], problems, options) -> Path:
    """report.html: headline (WER per model and SNR, correlation), the three figures, the WER table,
    the per-class table, the layer probe, the caches' metadata, the options and the problem rows."""
    labels = _labels(panels)
    several = len(panels) > 1
    hi, lo = summary["snrs"][0], summary["snrs"][-1]
    cards = []
    for p, label in zip(panels, labels):
        m = summary["models"][p["name"]]
        who = f"{label}: " if several else ""
        cards += [(f"{who}WER at {s} dB (%)", None if v is None else 100 * v) for s, v in m["wer"].items()]
        c = m["classwise"]
        if c["pearson_r"] is not None:
            cards.append((f"{who}Pearson r, WER increase vs noise F1 (p = {c['p_value']:.2g}, "
                           f"{c['n_classes']} classes)", c["pearson_r"]))
        if m["noise_probe"]["accuracy"] is not None:
            cards.append((f"{who}noise alone: last-layer probe accuracy", m["noise_probe"]["accuracy"]))
    classwise = f"WER increase from {hi:+g} to {lo:+g} dB against the class F1 of a last-layer linear probe on the " \
                "noise clips alone (paper figure 2)"
    per_model = [(summary["models"][p["name"]]["classwise_figure"], f"{label}, per noise class: {classwise}.")
                 for p, label in zip(panels, labels)] if several else \
        [("classwise.png", f"Per noise class: {classwise}.")]
    figs = "".join(H.figure(out / f, cap) for f, cap in (
        ("wer_vs_snr.png", "Corpus WER per SNR, one line per model (paper figure 1, upper)."),
        *per_model,
        ("layers.png", "Linear probe of the noise class per encoder layer on the noisy speech, one line per SNR "
                       "(paper figure 1, lower); dotted: chance; dashed, or named at the edge when outside the axis: the "
                       "last-layer probe on the noise clips alone.")))
    overall = H.table(["SNR (dB)"] + [f"WER (%), {label}" for label in labels] + ["mixtures scored"],
                      [[s] + [None if p_wer is None else 100 * p_wer for p_wer in
                              (summary["models"][p["name"]]["wer"][f"{s:+g}"] for p in panels)]
                       + [", ".join(str(r["utterances"]) for r in rows
                                    if r["snr"] == s and r["noise_class"] == "all")] for s in summary["snrs"]],
                      sortable=False)
    sections = [H.Section("Headline", H.headline(cards)), H.Section("Overall WER per SNR", overall),
                H.Section("Figures", figs),
                H.Section("WER per model, SNR and noise class (wer.csv)", H.table(
                    ["model", "SNR (dB)", "noise class", "mixtures", "words", "errors", "WER (%)"],
                    [(r["model"], r["snr"], r["noise_class"], r["utterances"], r["words"], r["errors"],
                      None if _finite(r["wer"]) is None else 100 * r["wer"]) for r in rows]))]
    for p, label in zip(panels, labels):
        cap = y_cap(np.array([q["wer_increase"] for q in p["points"]], float))
        sections.append(H.Section(f"Per noise class{': ' + label if several else ''}", H.table(
            ["class", "probe F1 (noise alone)", f"WER at {hi:+g} dB (%)", f"WER at {lo:+g} dB (%)",
             "WER increase (points)", "in figure 2"],
            [(q["class"], q["f1"], 100 * q["wer_high_snr"], 100 * q["wer_low_snr"], q["wer_increase"],
              "yes" if cap is None or q["wer_increase"] <= cap else f"no: above +{cap:g}") for q in p["points"]])))
        layer_rows = [(f"{s:+g}", layer, a, sd) for s, (ls, acc, std) in sorted(p["layers"].items(), reverse=True)
                      for layer, a, sd in zip(ls, acc, std)]
        if layer_rows:
            sections.append(H.Section(f"Noise-class probe per layer{': ' + label if several else ''}", H.table(
                ["SNR (dB)", "layer", "accuracy", "std over folds"], layer_rows)
                + H.paragraph(f"{p['protocol']}; chance {H.fmt(p['chance'])}.")))
        for why_snr, why in p["not_probed"].items():
            sections.append(H.Section(f"Not probed at {why_snr:+g} dB{': ' + label if several else ''}",
                                      H.paragraph(why)))
    for p, label in zip(panels, labels):
        m = summary["models"][p["name"]]
        sections.append(H.Section(f"Cache of the mixtures: {label}", H.key_values(
            H.cache_metadata(p["meta"], p["n_mixtures"], m["features"])
            | {"utterances scored": m["utterances_scored"],
               "mixtures scored": m["mixtures_scored"], "mixtures skipped": m["mixtures_skipped"],
               "encoder passes": m["encoder_passes"]})))
        sections.append(H.Section(f"Cache of the noise clips alone: {label}", H.key_values(
            H.cache_metadata(p["noise_meta"], p["n_noise"], m["noise_features"]))))
    sections.append(H.Section("Options", H.key_values(
        {"speech": f"{summary['speech']['kind']}, {speech_line(summary['speech'])}",
         "noise": f"{summary['noise']['dataset']}, {summary['noise']['clips']} clips, "
                  f"{summary['noise']['classes']} classes",
         **{k.replace("_", " "): v for k, v in dataclasses.asdict(options).items()},
         "mixtures per model": summary["mixtures_per_model"],
         "SNR definition": summary["snr_definition"], "WER definition": summary["wer_definition"]})))
    if problems:
        sections.append(H.Section(f"Problem rows ({len(problems)}, also in problems.tsv)", H.table(
            ["model", "id", "path", "reason"], [tuple(p) for p in problems[:500]])
            + (H.paragraph(f"... {len(problems) - 500} more in problems.tsv") if len(problems) > 500 else "")))
    sub = (f"{', '.join(labels)}: {summary['mixtures_per_model']} mixtures of {summary['speech']['utterances_planned']} "
           f"utterances ({summary['speech']['kind']}) x {summary['noise_per_utterance']} "
           f"{summary['noise']['dataset']} noise clip(s) x SNRs {', '.join(f'{s:+g}' for s in summary['snrs'])} dB; "
           f"{speech_line(summary['speech'])}")
    return H.write_report(out / "report.html", "wat-robust: speech recognition under background sounds", sub,
                          sections)
