"""Does wat-train's default recipe hold across small data sets of different character? Each head
kind with default options (or `--set` overrides), 5-fold cross-validation on the cache's folds,
next to the best single-layer linear probe on the same cache and folds (wat-probe; issue 23.3: TL-Tr
and WA-Tr within 2 points of it).

The sets are made here from the demo's synthetic sound generator (`wat.data.demo.synth_clip`:
confusable classes over background scenes), with real Whisper features (trim policy), and cached
under --out (audio, manifest, feats.h5, one JSON line per finished run in results.jsonl), so a
rerun only does what is missing:

    python bench/head_recipe.py --out scratch/sets --sets demo110,few100 --heads tl-tr,wa-tr,wa-mlp
    python bench/head_recipe.py --out scratch/sets --sets hard320 --heads wa-tr --set lr=1e-3 --tag lr1e-3
    python bench/head_recipe.py --out scratch/sets --table          # the table from results.jsonl

Prints per set: clips, classes, chance, each layer's probe and the best; per run: the head's
weight-averaged score (`wa`, the wa.pt a user gets: with the probe start, the start where it scored
higher on the held-back training clips) and best epoch (chosen on the held-out folds, so optimistic),
minus the best probe, per fold, how many folds kept the probe start, minutes. `--tag` names a recipe in the table
(default: the current code's defaults, "default"); rows with the same set, head, tag and seed are
not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# index of each class in wat.data.demo.CLASSES, by name
TONE, CHIRP, WHITE, PINK, BROWN, CLICKS, SIREN, ENGINE, RAIN, BIRDS, KNOCK = range(11)
# combinations of confusable classes: 5 more classes for the 16-class sets (each also contains a
# class of its own: "siren+tone" vs "siren" vs "tone")
PAIRS = ((SIREN, TONE), (CHIRP, SIREN), (ENGINE, CLICKS), (RAIN, WHITE), (PINK, BROWN))
SINGLES = tuple((c,) for c in range(11))


@dataclass(frozen=True)
class SetSpec:
    classes: tuple            # each class: a tuple of demo classes sounding together
    clips_per_class: int      # single-label; multi-label: clips in all = this x len(classes)
    snr_db: tuple             # event(s) vs background scene, drawn uniformly
    seed: int
    multilabel: bool = False  # each clip: 1..3 of the classes, all of them labels
    model: str = "tiny.en"


SETS = {
    # the demo's character (11 classes, 10-30 dB), 110 clips
    "demo110": SetSpec(SINGLES, 10, (10.0, 30.0), seed=100),
    # few classes, few clips, cleaner
    "few100": SetSpec(SINGLES[:5], 20, (15.0, 35.0), seed=101),
    # the hard set: 16 confusable classes (11 + 5 combinations), noisy
    "hard320": SetSpec(SINGLES + PAIRS, 20, (0.0, 10.0), seed=102),
    # same character on base (6 layers x 512)
    "hard320-base": SetSpec(SINGLES + PAIRS, 20, (0.0, 10.0), seed=102, model="base"),
    # multi-label: 1..3 of 11 classes per clip, mAP
    "multi440": SetSpec(SINGLES, 40, (5.0, 25.0), seed=103, multilabel=True),
    # more clips per class, very noisy
    "noisy660": SetSpec(SINGLES, 60, (-5.0, 10.0), seed=104),
    # the largest: 16 classes x 125
    "hard2000": SetSpec(SINGLES + PAIRS, 125, (0.0, 15.0), seed=105),
}


def class_name(c: tuple) -> str:
    from wat.data.demo import CLASSES
    return "+".join(CLASSES[i].__name__ for i in c)


def build(name: str, spec: SetSpec, out: Path) -> Path:
    """Write the set's audio (44.1 kHz 16-bit, 5 s, like the demo) and its path,labels,fold manifest."""
    import soundfile as sf
    from wat.data.demo import RATE, synth_clip
    from wat.data.files import write_csv
    folder = out / name
    manifest = folder / "manifest.csv"
    if manifest.exists():
        return manifest
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    n = spec.clips_per_class * len(spec.classes)
    for j in range(n):
        if spec.multilabel:
            rng = np.random.default_rng([spec.seed, 7, j])
            picked = rng.choice(len(spec.classes), size=rng.integers(1, 4), replace=False)
            events = tuple(e for k in picked for e in spec.classes[k])
            labels = ";".join(sorted(class_name(spec.classes[k]) for k in picked))
            fold = j % 5 + 1
        else:
            k, i = divmod(j, spec.clips_per_class)
            events, labels, fold = spec.classes[k], class_name(spec.classes[k]), i % 5 + 1
        path = f"audio/{j:05d}.wav"
        if not (folder / path).exists():
            x = synth_clip(events[0], spec.seed, j, events=events[1:], snr_db=spec.snr_db)
            sf.write(folder / path, x, RATE, subtype="PCM_16")
        rows.append((path, labels, fold))
    write_csv(manifest, ("path", "labels", "fold"), rows, lineterminator="\n")
    return manifest


def features(name: str, spec: SetSpec, out: Path) -> Path:
    feats = out / name / "feats.h5"
    if feats.exists():
        return feats
    from wat.data import load_dataset
    from wat.extract import load_whisper
    from wat.extract.pipeline import ExtractOptions, extract_dataset
    manifest = build(name, spec, out)
    ds = load_dataset("csv", manifest, clip_seconds=5)
    t = time.perf_counter()
    extract_dataset(ds, ExtractOptions(model=spec.model, policy="trim", shard_size=256, num_workers=0,
                                       progress=False), feats, model=load_whisper(spec.model))
    print(f"{name}: extracted {len(ds.clips)} clips ({spec.model}, trim) in {(time.perf_counter() - t) / 60:.1f} min",
          flush=True)
    return feats


def split(feats: Path, fold: int) -> tuple[Path, Path]:
    """(training cache, eval cache): the clips of the other folds and of `fold`, as two caches
    written through the real writer (the same rows, features and time means)."""
    from common import write_subset
    from wat.data.cache import open_cache
    folder = feats.parent / f"holdout{fold}"
    got = folder / "train" / "feats.h5", folder / "eval" / "feats.h5"
    if all(p.exists() for p in got):
        return got
    cache = open_cache(feats)
    held = cache.folds == fold
    for rows, index in ((np.flatnonzero(~held), got[0]), (np.flatnonzero(held), got[1])):
        index.parent.mkdir(parents=True, exist_ok=True)
        write_subset(cache, rows, index)
    return got


def probe_scores(name: str, feats: Path, out: Path, fold: int | None) -> dict:
    """The linear probe of every layer (wat-probe's defaults) on the cache's folds, or trained on
    the other folds and scored on `fold`; stored."""
    path = out / name / ("probe.json" if fold is None else f"probe-holdout{fold}.json")
    if path.exists():
        return json.loads(path.read_text())
    from wat.data.cache import open_cache
    from wat.eval import metrics
    from wat.eval.probe import ProbeOptions, probe
    tr, ev = (feats, None) if fold is None else split(feats, fold)
    rep = probe([str(tr)], None if ev is None else [str(ev)], ProbeOptions(fusion=(), jobs=1))
    cache = open_cache(feats if ev is None else ev)
    y = cache.label_matrix()
    rec = {"layers": [r.score for r in sorted(rep.results, key=lambda r: r.feature.layers[0][0])],
           "clips": len(cache), "classes": len(cache.meta.vocab), "multilabel": cache.meta.multilabel,
           "chance": float(metrics.chance(y if cache.meta.multilabel else y.argmax(1)))}
    path.write_text(json.dumps(rec))
    return rec


def run_head(name: str, feats: Path, out: Path, head: str, seed: int, tag: str, extra: dict,
             fold: int | None) -> dict:
    from wat.train.loop import TrainOptions, train
    where = "runs" if fold is None else f"runs-holdout{fold}"
    run_dir = out / name / where / f"{head}-{tag}-s{seed}"
    t = time.perf_counter()
    if fold is None:
        kw = dict(features=str(feats), folds=5)
    else:
        tr, ev = split(feats, fold)
        kw = dict(features=str(tr), eval_features=str(ev))
    final = train(TrainOptions(out=str(run_dir), head=head, seed=seed, progress=False, **kw, **extra))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"set": name, "protocol": "5-fold" if fold is None else f"holdout{fold}", "head": head, "tag": tag,
            "seed": seed, "extra": extra, "best": final["best"], "best_epoch": final["best_epoch"], "wa": final["wa"],
            "folds": [f["wa"] for f in final["folds"].values()] if fold is None else [final["wa"]],
            "minutes": (time.perf_counter() - t) / 60,
            "kept": [r["kept"] for r in final.get("probe_start", {}).values()],
            "batch": metrics["options"]["batch_size"], "lr": metrics.get("lr"),
            "load": os.getloadavg()[0]}


def results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kept(r: dict) -> str:
    """How many of the run's heads are the probe start (kept over the trained head), e.g. '2/5'."""
    k = r.get("kept") or []
    return f"{k.count('start')}/{len(k)}" if k else "-"


def table(out: Path, names) -> None:
    rows = results(out)
    for name in names:
      for protocol in ("5-fold", *sorted({r.get("protocol", "5-fold") for r in rows if r["set"] == name} - {"5-fold"})):
        p = out / name / ("probe.json" if protocol == "5-fold" else f"probe-{protocol}.json")
        if not p.exists():
            continue
        pr = json.loads(p.read_text())
        best = max(pr["layers"])
        metric = "mAP" if pr["multilabel"] else "accuracy"
        print(f"\n{name} ({protocol}): {pr['clips']} clips, {pr['classes']} classes, {SETS[name].model}, SNR {SETS[name].snr_db} dB, "
              f"{metric}, chance {pr['chance']:.3f}; probe per layer {' '.join(f'{v:.3f}' for v in pr['layers'])}, "
              f"best {best:.4f} (layer {int(np.argmax(pr['layers']))})")
        print(f"  {'head':7} {'tag':14} {'seed':>4} {'batch':>5} {'best':>7} {'wa':>7} {'wa-probe':>8} "
              f"{'wa per fold':>30} {'start kept':>10} {'min':>5} {'load':>5}")
        for r in rows:
            if r["set"] == name and r.get("protocol", "5-fold") == protocol:
                print(f"  {r['head']:7} {r['tag']:14} {r['seed']:4d} {r['batch']:5d} {r['best']:7.4f} {r['wa']:7.4f} "
                      f"{r['wa'] - best:+8.4f} {' '.join(f'{f:.3f}' for f in r['folds']):>30} {kept(r):>10} {r['minutes']:5.1f} "
                      f"{r['load']:5.1f}")


def _set_name(text: str) -> str:
    """One --sets item: a name of SETS."""
    if text not in SETS:
        raise ValueError(text)
    return text


def main() -> None:
    from common import head_kinds, path_arg, seeds, train_overrides
    from wat.data.clikit.args import comma_list_of, int_range
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=path_arg("folder"))
    p.add_argument("--sets", type=comma_list_of(_set_name, what=f"set ({', '.join(SETS)})"), default=",".join(SETS))
    p.add_argument("--heads", type=head_kinds, default="tl-tr,wa-tr,wa-mlp")
    p.add_argument("--seeds", type=seeds, default="0")
    p.add_argument("--set", type=train_overrides, default="", help="TrainOptions overrides, e.g. lr=1e-3,proj_dim=64")
    p.add_argument("--tag", default="default", help="the recipe's name in results.jsonl and the table")
    p.add_argument("--holdout", type=int_range(1, 5), help="train on the other folds and score this one (5x cheaper "
                   "than the 5-fold protocol; the probe likewise)")
    p.add_argument("--threads", type=int_range(1, 256), default=1, help="torch threads (the machine is shared)")
    p.add_argument("--table", action="store_true", help="only print the table of stored results")
    a = p.parse_args()
    names = a.sets
    if a.table:
        table(a.out, names)
        return
    import torch
    torch.set_num_threads(a.threads)
    extra = a.set
    protocol = "5-fold" if a.holdout is None else f"holdout{a.holdout}"
    done = {(r["set"], r.get("protocol", "5-fold"), r["head"], r["tag"], r["seed"]) for r in results(a.out)}
    a.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        feats = features(name, SETS[name], a.out)
        pr = probe_scores(name, feats, a.out, a.holdout)
        print(f"{name}: probe per layer {' '.join(f'{v:.3f}' for v in pr['layers'])}", flush=True)
        for head in a.heads:
            for seed in a.seeds:
                if (name, protocol, head, a.tag, seed) in done:
                    continue
                r = run_head(name, feats, a.out, head, seed, a.tag, extra, a.holdout)
                with open(a.out / "results.jsonl", "a") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"{name} {head} {a.tag} seed {seed}: wa {r['wa']:.4f} best {r['best']:.4f} "
                      f"(probe {max(pr['layers']):.4f}) {r['minutes']:.1f} min", flush=True)
    table(a.out, names)


if __name__ == "__main__":
    main()
