"""wat-probe (layer-wise linear probes) and wat-eval (score a trained head on a cache)."""
from __future__ import annotations

import argparse
from pathlib import Path

from wat.data.clikit.args import (MAX_CLASSES, add_device, add_features, add_out, add_workers, comma_list, float_range,
                                  int_range, layer_list, layers_text, nonempty, parse_args, seed_int)
from wat.data.clikit.main import run_command

from .logistic import DEFAULT_C, DEFAULT_MAX_ITER


def probe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wat-probe", description="Probes (linear; X-ARES's MLP and kNN) on every "
                                "encoder layer's time-mean features (and fusion baselines); reads only the cache's "
                                "`mean` dataset.")
    add_features(p, "cache to probe; repeat to also probe the concatenation of several caches "
                    "(same clip ids in the same order)", repeat=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--eval-features", action="append", metavar="TEST_H5", type=nonempty("cache path"),
                   help="train on --features, test on this cache (one per --features)")
    g.add_argument("--folds", type=int_range(2, 1000), default=None,
                   help="K-fold protocol: the cache's own folds when it has them (a K given must be their "
                        "number), else a seeded K-fold split (default 5)")
    p.add_argument("--layers", type=layer_list, default="all", metavar="all|BLOCKS",
                   help="'all' (default), or comma-separated encoder blocks and START:STOP ranges of them (STOP "
                        "exclusive, as wat-extract --layers; an open end is the cache's first or last block), "
                        "e.g. 0,8:16")
    p.add_argument("--fusion", default="mean,concat",
                   help="baselines: none, or any of mean,concat,avg,mean_g,avg_g (mean: layer mean, across caches "
                        "concatenated = the HEAR seed's fusion_cat; concat: every layer; avg: layer means averaged "
                        "across caches, fusion_avg; _g: k time groups of frames, each group's mean concatenated)")
    # --groups, --align-to and --match-width default to None/False so that a value given where no fusion
    # asked for uses it can be refused (`wat.eval.probe.check_fusion_options`)
    p.add_argument("--groups", type=int_range(1, 1000), default=None, metavar="K",
                   help="time groups of the _g fusions (default 5, the HEAR seed's; a cache with fewer frames "
                        "skips them with a note, while a K given that exceeds them is refused)")
    p.add_argument("--align-to", type=int_range(1, 1000), default=None, metavar="N",
                   help="fusions across caches: the N-th --features cache whose frame count the others are "
                        "linearly interpolated to (_g fusions), and whose width with --match-width (default 1)")
    p.add_argument("--match-width", action="store_true",
                   help="fusions across caches: interpolate every cache's layer mean to the --align-to cache's width "
                        "first (the HEAR seed's optional step; lets avg fuse encoders of different widths)")
    p.add_argument("--relative-depth", action="store_true",
                   help="layers.png: x = layer / number of layers (encoders of different depth on one axis) "
                        "instead of the layer index")
    p.add_argument("--probe", default="linear", metavar="KINDS",
                   help="comma-separated probe kinds, each with its benchmark's protocol: linear (standardised "
                        "features, L2 logistic regression; default), mlp (X-ARES: LayerNorm + Linear, Adam, "
                        "--mlp-* options), knn (X-ARES: cosine, --knn-k neighbours, softmax at --knn-temperature)")
    p.add_argument("--mlp-lr", type=float_range(0, 10, lo_open=True), default=1e-3, help="mlp probe: Adam's "
                   "learning rate at the first epoch, cosine-annealed to a tenth of it (X-ARES: 1e-3)")
    p.add_argument("--mlp-epochs", type=int_range(1, 10_000), default=10, help="mlp probe: epochs (X-ARES: 10)")
    p.add_argument("--mlp-batch-size", type=int_range(1, 1 << 20), default=32, help="mlp probe: batch (X-ARES: 32)")
    p.add_argument("--knn-k", type=int_range(1, 100_000), default=10, help="knn probe: neighbours (X-ARES: 10)")
    p.add_argument("--knn-temperature", type=float_range(0, 1e6, lo_open=True), default=0.07,
                   help="knn probe: softmax temperature on the cosine similarities (X-ARES: 0.07)")
    g = p.add_mutually_exclusive_group()
    add_workers(g, "--jobs", help="worker processes (default: the CPUs available)")
    g.add_argument("--scheduler", metavar="ADDRESS", type=nonempty("scheduler address"), help="run the fits on this dask scheduler")
    p.add_argument("--C", type=float_range(0, 1e12, lo_open=True), default=DEFAULT_C, help="inverse L2 regularisation strength")
    p.add_argument("--max-iter", type=int_range(1, 1_000_000), default=DEFAULT_MAX_ITER)
    p.add_argument("--seed", type=seed_int, default=0)
    add_device(p, "device of the multi-label linear, mlp and knn probes")
    add_out(p, "output folder: report.html, layers.csv, layers.png, summary.json, ...", metavar="PROBE_DIR")
    return p


def probe_main(argv=None) -> int:
    return run_command("wat-probe", lambda: _probe(argv))


def _probe(argv) -> int:
    a = parse_args(probe_parser(), argv)
    from wat.data.fusion import GROUPS

    from .probe import ProbeOptions, default_jobs, parse_fusion, parse_probes, probe
    from .report import write_probe

    fusion = parse_fusion(a.fusion)
    # --groups/--align-to/--match-width where no fusion uses them, a cache given twice: refused by probe()
    opts = ProbeOptions(layers=a.layers, fusion=fusion, folds=a.folds,
                        jobs=a.workers or default_jobs(), scheduler=a.scheduler, C=a.C, max_iter=a.max_iter,
                        seed=a.seed, device=a.device, groups=a.groups,
                        align_to=None if a.align_to is None else a.align_to - 1,
                        match_width=a.match_width, probes=parse_probes(a.probe, {
                            "mlp": dict(lr=a.mlp_lr, epochs=a.mlp_epochs, batch_size=a.mlp_batch_size),
                            "knn": dict(k=a.knn_k, temperature=a.knn_temperature)}))
    rep = probe(a.features, a.eval_features, opts)
    # as typed (not as slices), with the defaults that applied
    shown = {**vars(a), "layers": layers_text(a.layers), "groups": a.groups or GROUPS, "align_to": a.align_to or 1}
    summary = write_probe(rep, a.out, {f"--{k.replace('_', '-')}": v for k, v in shown.items()},
                          relative_depth=a.relative_depth)
    for kind in rep.probes:
        _print_probe(rep, summary, kind)
    for note in summary["notes"]:
        print(f"  note: {note}")
    print(f"outputs in {a.out}: {', '.join(summary['files'])}")
    print(f"report: {Path(a.out) / 'report.html'}")
    return 0


def _print_probe(rep, summary: dict, kind: str) -> None:
    """The best layer (per model when several) and the fusions of one probe kind."""
    b = summary["best_layer_by_probe"][kind]
    print(f"{rep.protocol}: {kind + ' probe: ' if len(rep.probes) > 1 else ''}best layer {b['layer']}"
          + (f" of features {b['features']}" if len(rep.caches) > 1 else "")
          + f" {rep.metric} {b['score']:.4f} (+-{b['score_std']:.4f}), macro-F1 {b['macro_f1']:.4f}; chance {rep.chance:.4f}")
    several = len(rep.caches) > 1
    if several:
        for m in summary["models"]:
            best = max((r for r in summary["layers"] if r["features"] == m["features"] and r["probe"] == kind),
                       key=lambda r: r["score"])
            print(f"  {m['label']} ({m['code']}): best layer {best['layer']} {rep.metric} {best['score']:.4f}")
    for f in (f for f in summary["fusion"] if f["probe"] == kind):
        if several:
            print(f"  fusion {f['name']} ({f['description']}): {rep.metric} {f['score']:.4f}")
        else:
            print(f"  fusion {f['fusion']} of the layers: {rep.metric} {f['score']:.4f}")


def _fold_list(text: str) -> tuple[int, ...]:
    """--tune-folds: comma-separated fold numbers (>= 0), at least one (an empty list would tune on every fold)."""
    return comma_list(text, int_range(0), what="fold number (>= 0)")


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wat-eval", description="Score a trained head on a feature cache; or, with "
                                "--table, lay finished wat-train runs out as Whisper-AT's Table 1.")
    add_features(p, "cache to score the head on (required without --table)", metavar="TEST_H5", required=False)
    p.add_argument("--head", metavar="HEAD_PT|whisper-at|whisper-at-low", type=nonempty("head"),
                   help="wat head (RUN_DIR/wa.pt), an official Whisper-AT head file, or whisper-at / whisper-at-low: "
                        "the official head of the cache's Whisper model, downloaded once (required without --table)")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", type=nonempty("run folder"),
                   help="instead: wat-train output folders (--folds K or --eval-features runs) -> OUT/table.md and "
                        "table.csv, one row per encoder and head, a column per dataset (the paper's Table 1 layout)")
    p.add_argument("--top-k", type=int_range(1, MAX_CLASSES), default=5, help="top-k class indices saved per clip (and top-k accuracy)")
    p.add_argument("--threshold", type=float_range(0, 1), help="decision threshold for every class (multi-label)")
    p.add_argument("--tune-thresholds-on", metavar="CACHE", type=nonempty("cache path"),
                   help="tune per-class max-F1 thresholds on this cache (never the eval set; e.g. a validation "
                        "cache) and save them with a copy of the head")
    p.add_argument("--tune-folds", type=_fold_list, metavar="F,..",
                   help="tune only on these folds of that cache (the folds the head did not train on)")
    p.add_argument("--batch-size", type=int_range(1, 1 << 20), default=256)
    add_device(p)
    add_out(p, "output folder: metrics.json, per_class.csv, predictions.npz, report.html, ...; with --table "
               "table.md and table.csv", metavar="EVAL_DIR")
    return p


def eval_main(argv=None) -> int:
    return run_command("wat-eval", lambda: _eval(argv))


def _eval(argv) -> int:
    p = eval_parser()
    a = parse_args(p, argv)
    from .evaluate import EvalError, EvalOptions, evaluate

    if a.table:
        if a.features or a.head:
            p.error("--table reads finished runs: give it without --features/--head")
        return _table_main(a)
    if not (a.features and a.head):
        p.error("the following arguments are required: --features, --head (or --table RUN_DIR ...)")
    folds = a.tune_folds
    if folds and not a.tune_thresholds_on:
        raise EvalError("--tune-folds needs --tune-thresholds-on")
    opts = EvalOptions(top_k=a.top_k, threshold=a.threshold, tune_on=a.tune_thresholds_on, tune_folds=folds,
                       batch_size=a.batch_size, device=a.device)
    r = evaluate(a.features, a.head, a.out, opts)
    line = f"{r['n_clips']} clips: mAP {_f(r['mAP'])}, mAUC {_f(r['mAUC'])}, d' {_f(r['d_prime'])}"
    if r.get("accuracy") is not None:
        line += f", accuracy {_f(r['accuracy'])}, top-{r['top_k']} {_f(r['top_k_accuracy'])}"
    if r["skipped_classes"]:
        line += f"; {len(r['skipped_classes'])} class(es) without positives skipped"
    print(line)
    if "decisions" in r:
        d = r["decisions"]
        print(f"thresholds {d['thresholds']}: macro-F1 {_f(d['macro_f1'])}, micro-F1 {_f(d['micro_f1'])}")
    print(f"outputs in {a.out}; report: {Path(a.out) / 'report.html'}")
    return 0


def _table_main(a) -> int:
    from .table import write_table

    header, lines, rows = write_table(a.table, a.out)
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    for line in [header] + lines:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    print(f"scores in %: the weight-averaged head, fold mean ± std ({len(rows)} runs); "
          f"table in {Path(a.out) / 'table.md'} and table.csv")
    return 0


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
