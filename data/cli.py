"""`wat-data`: write the demo dataset, or load a dataset and summarise it."""
from __future__ import annotations

import argparse
from collections import Counter

from .clikit.args import add_encoding, add_out, int_range, nonempty, parse_args, seed_int
from .clikit.main import run_command
from .datasets import DATASET_KINDS, DatasetError, load_dataset, problem_counts
from .demo import CLASSES, make_demo
from .errors import WatError


def main(argv=None) -> int:
    return run_command("wat-data", lambda: _main(argv))


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="wat-data", description="Datasets for wat: demo data and manifest checks.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write a synthetic ESC-50-layout dataset")
    add_out(demo, "output folder (gets audio/ and meta/esc50.csv)")
    demo.add_argument("--clips-per-class", type=int_range(1, 10_000), default=8)
    demo.add_argument("--seed", type=seed_int, default=0)
    show = sub.add_parser("list", help="load a dataset and print counts, classes and skipped rows")
    show.add_argument("--dataset", required=True, choices=DATASET_KINDS)
    show.add_argument("--root", required=True, type=nonempty("dataset folder"), help="dataset folder (audio is looked up under it)")
    show.add_argument("--manifest", type=nonempty("manifest path"), help="manifest file or folder, when not in the default place")
    add_encoding(show, "manifest")
    show.add_argument("--problems", type=int_range(0, 1_000_000), default=5, help="how many skipped rows to show (default 5)")
    args = parse_args(parser, argv)

    try:
        if args.command == "demo":
            out = make_demo(args.out, clips_per_class=args.clips_per_class, seed=args.seed)
            print(f"wrote {len(CLASSES)} classes x {args.clips_per_class} clips to {out}")
        else:
            _list(load_dataset(args.dataset, args.root, args.manifest, encoding=args.encoding), args.problems)
    except ValueError as e:  # a value the demo writer or a reader refuses without a typed error
        if isinstance(e, WatError):
            raise
        raise DatasetError(str(e)) from None
    return 0


def _list(ds, n_problems: int) -> None:
    per_class = Counter(i for clip in ds.clips for i in clip.labels)
    folds = Counter(clip.fold for clip in ds.clips)
    print(f"{ds.name}: {len(ds.clips)} clips, {len(ds.vocab)} classes, "
          f"{'multi' if ds.multilabel else 'single'}-label, {ds.clip_seconds:g} s per clip")
    if set(folds) != {-1}:
        print("folds: " + ", ".join(f"{k}: {v}" for k, v in sorted(folds.items())))
    used = sum(1 for i in range(len(ds.vocab)) if per_class[i])
    print(f"classes with clips: {used}/{len(ds.vocab)}")
    for i, n in per_class.most_common(10 if len(ds.vocab) > 20 else None):
        print(f"  {n:8d}  {ds.vocab.names[i]}")
    if ds.problems:
        counts = ", ".join(f"{n} {reason}" for reason, n in problem_counts(ds.problems).most_common())
        print(f"skipped {len(ds.problems)} rows: {counts}")
        for where, reason in ds.problems[:n_problems]:
            print(f"  {where}: {reason}")


if __name__ == "__main__":
    raise SystemExit(main())
