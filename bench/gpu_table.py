"""The one table of bench/gpu_check.sh: every GPU target of BENCHMARKS.md, from the JSON records
the bench scripts wrote into one folder (`--json`), with the figure, the target and ok/MISSED.

    python bench/gpu_table.py OUT_DIR [--markdown]

A step whose record is missing (it failed or timed out; its log is in OUT_DIR) is a row that says so.
Exit status: 0 when every step left its record, 1 otherwise (missed targets are not errors: the
table says which).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (step = record file stem, what the table calls it)
STEPS = (("extract_pad30", "extraction, pad30"), ("extract_trim", "extraction, trim"),
         ("extract_hf", "extraction, HF speech"),
         ("train_tltr", "training TL-Tr"), ("train_wamlp", "training WA-MLP"),
         ("probe", "probing, AudioSet shape"), ("tag", "tagging overhead"), ("robust", "wat-robust vs paper"))


def _ge(v, t):
    return v is not None and v >= t


def _stalls(st: dict) -> str:
    return (f"audio {st['audio']:.1f}, device {st['device']:.1f}, writer {st['writer']:.1f}, copies "
            f"{st['copies']:.1f} s; checksum {st['checksum']:.1f}, write {st['write']:.1f} s")


def rows(rec: dict, step: str) -> list[tuple[str, str, str, str]]:
    """(what, figure, target, verdict) rows of one record."""
    out = []

    def row(what, figure, target="", ok=None):
        out.append((what, figure, target, "" if ok is None else ("ok" if ok else "MISSED")))

    if step == "extract_hf":
        tag = f"{rec['model']} {rec['policy']}, batch {rec['batch_size']}, {rec['clip_seconds']:g} s clips (random weights)"
        row(f"pipeline clips/s [{tag}]", f"{rec['pipeline']:.1f} (bare {rec['bare']:.1f}, as pooled {rec['bare_hooked']:.1f})")
        row("pipeline/bare", f"{rec['pipeline_bare']:.3f}", ">= 0.9", _ge(rec["pipeline_bare"], 0.9))
        if rec.get("peak_gpu_gb") is not None:
            row("peak GPU memory (batch rule)", f"{rec['peak_gpu_gb']:.1f} GB of {rec['gpu_total_gb']:.0f}", "report")
        if rec.get("stalls"):
            row("pipeline waits (main loop; writer busy)", _stalls(rec["stalls"]), "report")
    elif step.startswith("extract"):
        tag = f"{rec['model']} {rec['policy']}, batch {rec['batch_size']}" + (" (random weights)" if rec["random_weights"] else "")
        row(f"pipeline clips/s [{tag}]", f"{rec['pipeline']:.1f} (bare {rec['bare']:.1f}, official {rec['official']:.2f})")
        row("pipeline/bare", f"{rec['pipeline_bare']:.3f}", ">= 0.9", _ge(rec["pipeline_bare"], 0.9))
        row("pipeline/official", f"{rec['pipeline_official']:.1f}", ">= 10", _ge(rec["pipeline_official"], 10))
        peak = rec.get("peak_tflops")
        pct = f" = {100 * rec['bare_tflops'] / peak:.0f}% / {100 * rec['pipeline_tflops'] / peak:.0f}% of {peak:.0f}" if peak else " (peak unknown)"
        row("encoder TFLOP/s bare / pipeline", f"{rec['bare_tflops']:.1f} / {rec['pipeline_tflops']:.1f}{pct}",
            "report (dense fp16 peak)")
        if rec.get("stalls"):
            row("pipeline waits (main loop; writer busy)", _stalls(rec["stalls"]), "report")
        if "null_encoder" in rec:  # --null-encoder: the host side's ceiling beside the disk's
            row("null-encoder pipeline / disk write clips/s", f"{rec['null_encoder']:.1f} / {rec['disk_clips']:.1f} "
                f"(disk {rec['disk_write_mb_s']:.0f} MB/s, {rec['mb_per_clip']:.2f} MB/clip; ratio {rec['null_disk']:.2f})",
                "report")
            row("null-encoder waits (main loop; writer busy)", _stalls(rec["null_stalls"]), "report")
    elif step.startswith("train"):
        target = 1000 if rec["head"] == "tl-tr" else 10000
        sps = rec["samples_per_s"]
        for mode in ("end to end, in memory", "end to end, streaming"):
            row(f"{rec['head']} {rec['size']} samples/s, {mode}", f"{sps[mode]:.0f} (ratio {rec['ratios'][mode]:.2f})",
                f">= {target}", _ge(sps[mode], target))
        row(f"{rec['head']} {rec['size']} samples/s, compute only", f"{sps['compute only']:.0f}")
        if "streaming reader only" in sps:  # the data path alone: what bounds streaming end to end
            row(f"{rec['head']} {rec['size']} samples/s, streaming reader only", f"{sps['streaming reader only']:.0f}")
    elif step == "probe":
        row(f"wat probe s/layer ({rec['clips']} clips, {rec['layers']} x {rec['dim']}, 527 classes)",
            f"{rec['wat_s_per_layer']:.2f} (best layer {rec['best_layer']}, mAP {rec['best_mAP']:.4f})")
        if "speedup_min" in rec:
            row("speed-up over sklearn OvR (extrapolated), |dmAP|",
                f"{rec['speedup_min']:.1f}x, {rec['dmAP_max_abs']:.4f}", ">= 5x, <= 0.005",
                rec["speedup_min"] >= 5 and rec["dmAP_max_abs"] <= 0.005)
    elif step == "tag":
        row(f"transcribe_and_tag / transcribe [{rec['model']}]", f"{rec['ratio']:.3f} ({rec['tagged_s']:.2f} / "
            f"{rec['plain_s']:.2f} s)", "<= 1.01", rec["ratio"] <= 1.01)
    elif step == "robust":
        row("wat-robust throughput / the paper's way", f"{rec['speedup']:.1f}x", ">= 5x", _ge(rec["speedup"], 5))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--markdown", action="store_true", help="a markdown table (for BENCHMARKS.md)")
    p.add_argument("--skip", default="", help="comma-separated steps not run on purpose")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    if not out.is_dir():
        p.error(f"{out}: no such folder")
    skip = set(filter(None, a.skip.split(",")))
    table, missing, device = [], [], None
    for step, title in STEPS:
        f = out / f"{step}.json"
        if step in skip:
            table.append((title, "not run", "", ""))
            continue
        try:
            rec = json.loads(f.read_text())
            device = device or rec.get("device")
            table += [(title if i == 0 else "", *r) for i, r in enumerate(rows(rec, step))]
        except (OSError, ValueError, KeyError, TypeError) as e:
            missing.append(step)
            table.append((title, f"FAILED: no result ({type(e).__name__}; see {out / (step + '.log')})", "", ""))
    head = ("step", "what", "figure", "target", "")
    flat = [(r[0], r[1], r[2], r[3], r[4]) if len(r) == 5 else (r[0], r[1], "", "", "") for r in table]
    print(f"GPU check on {device or 'unknown device'}")
    if a.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for r in flat:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(str(r[i])) for r in flat + [head]) for i in range(len(head))]
        for r in [head] + flat:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
