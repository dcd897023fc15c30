"""Fine-tuning from an official Whisper-AT head (`wat-train --init whisper-at`) vs training the same
head from scratch, same recipe (defaults), epochs, seed and clips: the study README "Coming from
whisper-at" quotes, made here from nothing.

The official weights cannot be downloaded without network, so the "official" head is a stand-in: a
TL-Tr trained with the default recipe on demo folds 1-2 (44 clips, seen by no run below), written in
the official file format (tests/official_mirror.py) and served as tiny.en_ori.pth by a loopback
mirror (WAT_WHISPER_AT_URL): `--init whisper-at` goes through the real download code. Each seed is
the whole experiment's: the stand-in's training, then, in two designs, fine-tuning and scratch, both
on trim features (the stand-in's; hence allow_policy_mismatch):
  1 clip per class:  fine-tune on fold 4 (11 clips), score folds 3 and 5 (33 clips)
  2 clips per class: fine-tune on fold 3 (22 clips), score folds 4 and 5 (22 clips)

    nice -n 19 python bench/init_from_head.py --out /tmp/ifh [--seeds 0,1,2] [--json FILE]

The demo set (make_demo, seed 0, 8 clips per class) goes through tiny.en, the offline PyPI copy
(WAT_OFFLINE=1, the tests' model), into OUT/feats.h5, made once. XDG_CACHE_HOME is OUT/xdg-cache:
the stand-in must never reach your own cache of official heads. One torch thread, as in the tests.
Prints accuracy on the scored clips of the weight-averaged head (the run's result) and of the best
epoch (chosen on the scored clips: optimistic), per design and seed, and the means.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from common import Server, demo_cache, init_vs_scratch, path_arg, seeds, serve_standin, write_json, write_subset

DESIGNS = {"1 clip/class": ((4,), (3, 5)), "2 clips/class": ((3,), (4, 5))}  # (fine-tune folds, scored folds)
PRETRAIN = (1, 2)


def folds(f: tuple[int, ...]) -> str:
    return "".join(map(str, f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=path_arg("folder"))
    p.add_argument("--seeds", type=seeds, default="0,1,2")
    p.add_argument("--json", type=path_arg("file"), help="also write the results here")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(a.out / "xdg-cache")
    import numpy as np
    import torch
    from wat.data import open_cache
    from wat.data.heads import official
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    os.environ["WAT_OFFLINE"] = "1"
    cache = open_cache(demo_cache(a.out))
    del os.environ["WAT_OFFLINE"]  # the mirror is on loopback: the download code must run
    work = a.out / "work"
    shutil.rmtree(work, ignore_errors=True)

    def split(name: str, f: tuple[int, ...]) -> Path:
        return write_subset(cache, np.flatnonzero(np.isin(cache.folds, f)), work / name / "feats.h5")

    pretrain = split("pretrain", PRETRAIN)
    designs = {design: (split(f"tune{folds(tune)}", tune), split(f"score{folds(score)}", score))
               for design, (tune, score) in DESIGNS.items()}
    server, rows = Server(), []
    try:
        os.environ[official.URL_ENV] = server.url
        for seed in a.seeds:
            # a new stand-in per seed: the digest recorded for the last one would refuse it
            shutil.rmtree(official.folder(), ignore_errors=True)
            file = serve_standin(server, pretrain, work / f"pretrain-seed{seed}", seed=seed)
            print(f"seed {seed}: stand-in official head trained on demo folds {PRETRAIN} ({cache.meta.model}, "
                  f"{cache.meta.policy}), served as {server.url}/{file}", flush=True)
            for design, (tune, score) in DESIGNS.items():
                ft, sc = designs[design]
                runs = init_vs_scratch(ft, sc, work / f"tune{folds(tune)}-seed{seed}", seed=seed)
                rows.append(dict(design=design, fine_tune_folds=tune, scored_folds=score, seed=seed,
                                 fine_tune_clips=len(open_cache(ft).ids), scored_clips=len(open_cache(sc).ids),
                                 **{f"{k}_{m}": runs[k][m] for k in ("scratch", "init") for m in ("wa", "best")}))
                print(f"  {design}: scratch {runs['scratch']['wa']:.3f}, init {runs['init']['wa']:.3f}", flush=True)
    finally:
        server.close()
    assert server.requests == [file] * len(a.seeds), server.requests  # each fetched once by the real download code
    print(f"\naccuracy on the scored clips, weight-averaged head (best epoch)\n"
          f"{'design':14} {'fine-tune':>9} {'scored':>6} {'seed':>4} {'scratch':>8} {'init':>8} {'best: scratch':>13} {'init':>6}")
    for design in DESIGNS:
        mine = [r for r in rows if r["design"] == design]
        for r in mine:
            print(f"{design:14} {r['fine_tune_clips']:9d} {r['scored_clips']:6d} {r['seed']:4d} {r['scratch_wa']:8.3f} "
                  f"{r['init_wa']:8.3f} {r['scratch_best']:13.3f} {r['init_best']:6.3f}")
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("scratch_wa", "init_wa", "scratch_best", "init_best")}
        wins = sum(r["init_wa"] > r["scratch_wa"] for r in mine)
        print(f"{design:14} mean of {len(mine)} seeds: scratch {mean['scratch_wa']:.3f}, init {mean['init_wa']:.3f} "
              f"(best epoch {mean['scratch_best']:.3f}, {mean['init_best']:.3f}); init ahead in {wins} of {len(mine)}")
    minutes = (time.perf_counter() - t0) / 60
    print(f"{minutes:.1f} min")
    if a.json:
        write_json(a.json, {"bench": "init_from_head", "model": cache.meta.model, "policy": cache.meta.policy,
                            "pretrain_folds": PRETRAIN, "rows": rows, "minutes": minutes})


if __name__ == "__main__":
    main()
