"""wat-cache: inspect and check a feature cache (index file or single shard)."""
from __future__ import annotations

import argparse
import json
import sys

from .cache import info, verify
from .clikit.args import nonempty, parse_args
from .clikit.main import error_line, run_command


def _print_info(d: dict) -> None:
    gb = d["bytes_on_disk"] / 1e9
    print(f"{d['path']}: {d['clips']} clips in {d['shards']} shard(s), {gb:.3f} GB on disk")
    stored = "int8 (per-shard scales; readers return f16)" if d["storage"] == "int8" else d["dtype"]
    lay = d["layers"]
    blocks = f"encoder blocks {lay[0]}..{lay[-1]}" if lay != list(range(len(lay))) else "all encoder blocks"
    print(f"  features {d['features']} {stored}, mean {d['mean']}; {blocks}")
    padding = {"mel": " (transcribe's window, log-mel padding)",
               "samples": " (zero-sample padding, before cache schema 4: not what transcription sees; re-extract)"}
    print(f"  model {d['model']} (fingerprint {d['fingerprint']}), policy {d['policy']}"
          f"{padding.get(d['pad30_padding'], '')}, pooling {d['pooling']}")
    print(f"  dataset {d['dataset']}, {d['clip_seconds']} s clips at {d['sample_rate']} Hz")
    lab = d["labels"]
    kind = "multi-label" if d["multilabel"] else "single-label"
    print(f"  {d['classes']} classes ({kind}), {lab['total']} labels, {lab['unlabeled_clips']} unlabeled clips, "
          f"per class {lab['min_per_class']}..{lab['max_per_class']}, {lab['classes_without_clips']} classes without clips")
    print("  folds " + ", ".join(f"{k}: {v}" for k, v in d["folds"].items()))
    print(f"  per-clip checksums in {d['checksums']} of {d['shards']} shard(s)"
          + ("" if d["checksums"] == d["shards"] else " (the others predate them: cache schema 1)"))


def main(argv=None) -> int:
    return run_command("wat-cache", lambda: _main(argv))


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="wat-cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="counts, shapes, model, policy, labels, size on disk")
    p_info.add_argument("file", type=nonempty("cache path"), help="index file (feats.h5) or shard")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_verify = sub.add_parser("verify", help="check every byte of every shard against its per-clip checksums; "
                                             "exit 1 listing each problem")
    p_verify.add_argument("file", type=nonempty("cache path"), help="index file (feats.h5) or shard")
    args = parse_args(parser, argv)
    if args.command == "info":
        d = info(args.file)
        print(json.dumps(d, indent=2)) if args.json else _print_info(d)
        return 0
    problems = verify(args.file)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(error_line("wat-cache", f"{len(problems)} problem(s) in {args.file} (listed above)"), file=sys.stderr)
        return 1
    d = info(args.file)
    print(f"OK: {d['clips']} clips, {d['shards']} shards")
    if d["checksums"] < d["shards"]:
        print(f"note: {d['shards'] - d['checksums']} of {d['shards']} shard(s) were written before per-clip "
              "checksums (cache schema 1): for them only all-zero/non-finite rows and a sample of means "
              "could be checked; re-extract with --overwrite to add checksums")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
