"""wat-extract: run a frozen encoder (Whisper, a Hugging Face speech model, CREPE) once over a dataset into a
resumable HDF5 feature cache."""
from __future__ import annotations

import argparse

from wat.data.cache import POLICIES, STORAGES
from wat.data.clikit.args import (ENCODER_HELP, MODEL_HELP, add_device, add_encoding, add_model, add_out,  # noqa: F401
                                  add_workers, float_range, int_range, layer_range, nonempty, parse_args)
from wat.data.clikit.main import run_command
from wat.data.datasets import DATASET_KINDS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wat-extract", description=__doc__,
        epilog="Rerunning the same command resumes: finished shards are kept, unfinished ones redone.")
    p.add_argument("--dataset", required=True, choices=DATASET_KINDS)
    p.add_argument("--root", required=True, type=nonempty("dataset folder"), help="dataset folder")
    p.add_argument("--manifest", type=nonempty("manifest path"), help="CSV/JSON manifest (AudioSet segment CSV, AST JSON, path,labels CSV)")
    add_encoding(p, "manifest")
    add_model(p, ENCODER_HELP)
    add_out(p, "index file to write, e.g. feats.h5 (shards go to feats.shards/)")
    p.add_argument("--policy", choices=POLICIES, default=None,
                   help="Whisper: pad30 (its default) encodes the 30 s window whisper.transcribe feeds the encoder "
                        "(the clip's log-mel padded with zero log-mel frames), pooling the clip's frames: what "
                        "wat-tag sees; trim encodes only the clip, faster. Other encoders have no 30 s window: "
                        "trim only (the default for them; pad30 is refused)")
    # bounds: beyond these a value is a typo, not a setting; what the encoder can give is checked once it is loaded
    p.add_argument("--frames", type=int_range(1, 100_000), default=25,
                   help="pooled frames per clip (default 25; Whisper: at most 1500, its frames of 30 s; "
                        "a clip with fewer encoder frames is skipped, listed in errors.tsv)")
    add_device(p)
    p.add_argument("--batch-size", type=int_range(1, 4096), default=16, help="clips per encoder call (default 16)")
    p.add_argument("--decode-workers", "--num-workers", dest="decode_workers", type=int_range(0, 256), default=None, metavar="N",
                   help="audio decoding processes (default: up to 8 on CUDA; on CPU 1 if a core is free of torch threads, else 0)")
    p.add_argument("--shard-size", type=int_range(1, 1_000_000), default=1000, help="clips per shard (default 1000)")
    p.add_argument("--limit", type=int_range(1), default=None, help="only the first N clips (sorted by id)")
    p.add_argument("--clip-seconds", type=float_range(0, 600, lo_open=True), default=None,
                   help="pad/trim every clip to this length (default: the dataset's; Whisper: at most 30 s, "
                        "other encoders at most 600 s)")
    p.add_argument("--storage", choices=STORAGES, default="fp16",
                   help="stored precision: fp16 (default) or int8 (half the bytes; per-shard scales per "
                        "layer and channel, dequantised by the readers)")
    p.add_argument("--store", dest="storage", choices=STORAGES, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--layers", type=layer_range, metavar="START:STOP",
                   help="keep only encoder blocks START..STOP-1 (e.g. 8:32 of large's 32; default all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache made differently")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", type=nonempty("scheduler address"), help="run one task per shard on this dask scheduler (tcp://HOST:PORT)")
    add_workers(where, "--local-workers", help="run on a local dask cluster of N worker processes")
    return p


def main(argv=None) -> int:
    return run_command("wat-extract", lambda: _main(argv), interrupted="rerun the same command to resume")


def _main(argv) -> int:
    args = parse_args(parser(), argv)
    from wat.data.datasets import load_dataset

    from .pipeline import ExtractOptions, extract_dataset

    options = ExtractOptions(
        model=args.model, policy=args.policy, frames=args.frames, device=args.device, batch_size=args.batch_size,
        num_workers=args.decode_workers, shard_size=args.shard_size, limit=args.limit, overwrite=args.overwrite,
        clip_seconds=args.clip_seconds, storage=args.storage, layers=args.layers)
    dataset = load_dataset(args.dataset, args.root, args.manifest, clip_seconds=args.clip_seconds,
                           encoding=args.encoding)
    if args.scheduler or args.workers:
        from .cluster import DaskRunner, connect
        with connect(args.scheduler, args.workers, options.device) as client:
            summary = extract_dataset(dataset, options, args.out, runner=DaskRunner(client))
    else:
        summary = extract_dataset(dataset, options, args.out)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
