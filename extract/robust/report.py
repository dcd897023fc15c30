"""wat-robust's outputs: the probes (wat-probe's machinery on the caches the run wrote), wer.csv,
the three figures of the paper's section 3 and summary.json."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from wat.data.files import pyplot, save_figure, write_csv, write_json

WER_COLUMNS = ("model", "snr", "noise_class", "utterances", "words", "errors", "wer")
Y_CAP = 50.0  # WER increase (points) above which the paper lists classes apart (figure 2)


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


def plot_wer_vs_snr(rows: list[dict], models: list[str], path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        pts = sorted((r["snr"], 100 * r["wer"]) for r in rows if r["model"] == m and r["noise_class"] == "all")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.invert_xaxis()  # clean on the left, as in the paper
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("WER (%)")
    ax.set_title("WER of speech with background sounds (corpus level)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_classwise(per_model: dict, snrs: tuple[float, float], path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(per_model), figsize=(6.5 * len(per_model), 5), squeeze=False)
    for ax, (m, d) in zip(axes[0], per_model.items()):
        pts, corr = d["points"], d["correlation"]
        x = np.array([p["f1"] for p in pts], float)
        y = np.array([p["wer_increase"] for p in pts], float)
        # the paper's y-range ends at +50 points; when most classes lie above, show them all instead
        cap = Y_CAP if len(y) and (y <= Y_CAP).mean() >= 0.5 else (max(Y_CAP, float(y.max()) * 1.05) if len(y) else Y_CAP)
        inside = y <= cap
        ax.scatter(x[inside], y[inside], s=18)
        for p, keep in zip(pts, inside):
            if keep:
                ax.annotate(p["class"], (p["f1"], p["wer_increase"]), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
        if corr["slope"] is not None:
            xs = np.linspace(0, 1, 2)
            ax.plot(xs, corr["slope"] * xs + corr["intercept"], color="C3", lw=1, label="least-squares fit")
            ax.legend(fontsize=7, loc="upper left")
            title = f"{m}: Pearson r = {corr['pearson_r']:.2f} (p = {corr['p_value']:.2g}), {corr['n_classes']} classes"
        else:
            title = f"{m}: correlation undefined ({corr['n_classes']} classes)"
        ax.set_title(title, fontsize=9)
        low = min(0.0, float(y.min()) if len(y) else 0.0)
        ax.set_ylim(low - 2, cap + 2)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("class F1 of a last-layer linear probe on the noise clips alone")
        ax.set_ylabel(f"WER increase, {snrs[0]:+g} dB -> {snrs[1]:+g} dB (points)")
        beyond = sorted((p for p, keep in zip(pts, inside) if not keep), key=lambda p: -p["wer_increase"])
        if beyond:
            text = "beyond the y-range:\n" + "\n".join(f"{p['class']} (+{p['wer_increase']:.0f})" for p in beyond[:20])
            if len(beyond) > 20:
                text += f"\n... {len(beyond) - 20} more"
            ax.text(0.99, 0.99, text, transform=ax.transAxes, ha="right", va="top", fontsize=6,
                    bbox={"facecolor": "white", "alpha": 0.8, "lw": 0.5})
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_layers(per_model: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(per_model), figsize=(6 * len(per_model), 4), squeeze=False)
    for ax, (m, d) in zip(axes[0], per_model.items()):
        for snr, (layers, scores) in sorted(d["layers"].items(), reverse=True):
            ax.plot(layers, [100 * s for s in scores], marker="o", ms=3, label=f"{snr:+g} dB")
        if d.get("chance") is not None:
            ax.axhline(100 * d["chance"], color="grey", ls=":", lw=1, label="chance")
        if d["not_probed"]:
            ax.text(0.01, 0.01, "not probed: " + "\n".join(f"{s:+g} dB: {why[:90]}" for s, why in d["not_probed"].items()),
                    transform=ax.transAxes, fontsize=6, va="bottom")
        ax.set_xlabel("encoder layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("noise-class accuracy (%)")
        ax.set_title(f"{m}: linear probe of the background sound in noisy speech", fontsize=9)
        ax.grid(alpha=0.3)
        if d["layers"]:
            ax.legend(fontsize=7)
    save_figure(fig, path)


def _finite(v):
    return v if v is not None and not (isinstance(v, float) and math.isnan(v)) else None


def write_report(out: Path, plan, runs: list[dict], rows: list[dict], problems, options) -> dict:
    out = Path(out)
    write_csv(out / "wer.csv", WER_COLUMNS, [[r[k] for k in WER_COLUMNS] for r in rows])
    names = plan.noise.vocab.names
    snrs = sorted({r["snr"] for r in rows}, reverse=True)
    classwise, layers, models = {}, {}, {}
    for run in runs:
        m = run["name"]
        noise_rep, noise_why = _probe(run["noise_index"], [run["n_layers"] - 1], options)
        f1 = noise_rep.results[0].classwise_f1 if noise_rep else np.full(len(names), np.nan)
        points = classwise_points(rows, m, names, f1)
        corr = correlation(points)
        if noise_why:
            corr["note"] = f"noise-alone probe failed: {noise_why}"
        classwise[m] = {"points": points, "correlation": corr}
        per_snr, why_layers, chance = {}, {}, None
        for snr, path in run["per_snr"].items():
            rep, why = _probe(path, None, options)
            if rep is None:
                why_layers[snr] = why
                continue
            rs = rep.layer_results(0)
            per_snr[snr] = ([r.feature.layers[0][0] for r in rs], [r.score for r in rs])
            chance = rep.chance
        layers[m] = {"layers": per_snr, "chance": chance, "not_probed": why_layers}
        overall = {r["snr"]: r for r in rows if r["model"] == m and r["noise_class"] == "all"}
        models[m] = {
            "dir": str(run["dir"].relative_to(out)),
            "features": str(run["index"].relative_to(out)),
            "features_per_snr": {f"{s:+g}": str(p.relative_to(out)) for s, p in run["per_snr"].items()},
            "noise_features": str(run["noise_index"].relative_to(out)),
            "wer": {f"{s:+g}": _finite(overall[s]["wer"]) if s in overall else None for s in snrs},
            "mixtures_scored": sum(len(r["rows"]) for r in run["records"]),
            "mixtures_skipped": sum(len(r["errors"]) for r in run["records"]),
            # each mixture's audio went through the encoder once per 30 s window, transcript and features alike
            "encoder_passes": sum(row["encoder_passes"] for r in run["records"] for row in r["rows"]),
            "noise_probe": {"last_layer": run["n_layers"] - 1,
                            "accuracy": noise_rep.results[0].score if noise_rep else None,
                            "error": noise_why},
            "classwise": {**corr, "classes": points},
            "layers": {f"{s:+g}": {"layers": v[0], "accuracy": v[1]} for s, v in per_snr.items()},
            "layers_not_probed": {f"{s:+g}": why for s, why in why_layers.items()},
        }
    plot_wer_vs_snr(rows, list(models), out / "wer_vs_snr.png")
    plot_classwise(classwise, (snrs[0], snrs[-1]), out / "classwise.png")
    plot_layers(layers, out / "layers.png")
    summary = {
        "speech": {"kind": plan.speech.name, "utterances": len(plan.speech.utterances)},
        "noise": {"dataset": plan.noise.name, "clips": len(plan.noise.clips), "classes": len(names)},
        "snrs": snrs, "noise_per_utterance": options.noise_per_utterance, "seed": options.seed,
        "mixtures_per_model": len(plan.mixtures), "models": models, "problems": len(problems),
        "snr_definition": "10 log10(mean(speech^2) / mean(noise^2)) over the whole utterance",
        "wer_definition": "corpus level: sum(S+D+I) / sum(reference words), after EnglishTextNormalizer",
        "files": ["wer.csv", "wer_vs_snr.png", "classwise.png", "layers.png", "problems.tsv", "summary.json"],
    }
    write_json(out / "summary.json", summary)
    return summary
