"""wat-train: fit an audio-tagging head on a feature cache.
Data-parallel on N processes/GPUs: torchrun --nproc_per_node N -m wat.train.cli ... (same options;
--batch-size stays the global batch)."""
from __future__ import annotations

import argparse
import os

from wat.data.clikit.args import (add_device, add_features, add_out, float_range, int_range, nonempty, parse_args,
                                  seed_int)
from wat.data.clikit.main import run_command
from wat.data.heads import BUILTIN_KINDS, LAYER_ATTN_HEADS

from .options import BATCH, MIN_STEPS, PROBE_START_CLIPS, PROBE_START_MIN, TrainOptions


def _range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END epochs, got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected START:END epochs with 1 <= START <= END, got {text!r}")
    return a, b


def _folds(text: str) -> int:
    """0 (off) or K >= 2: one fold would train on nothing."""
    k = int_range(0, 1000)(text)
    if k == 1:
        raise argparse.ArgumentTypeError("expected 0 (off) or at least 2 folds, got 1")
    return k



def _proj_dim(text: str) -> int:
    """A projection width: a multiple of the layer transformer's heads (8), up to 65536."""
    d = int_range(LAYER_ATTN_HEADS, 65536)(text)
    if d % LAYER_ATTN_HEADS:
        raise argparse.ArgumentTypeError(f"expected a multiple of {LAYER_ATTN_HEADS}, got {d}")
    return d


_positive_lr = float_range(0, 10, lo_open=True)


def _lr(text: str) -> float | str:
    """A learning rate in (0, 10], or 'auto'."""
    if text == "auto":
        return text
    try:
        return _positive_lr(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} or 'auto'") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wat-train", description=__doc__)
    add_features(p, "training cache (feats.h5)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--eval-features", type=nonempty("cache path"), help="evaluation cache, scored every epoch (chooses best.pt)")
    g.add_argument("--folds", type=_folds, default=0, help="cross-validate over the cache's K folds (ESC-50: 5)")
    p.add_argument("--head", choices=BUILTIN_KINDS,
                   help="head kind (default: tl-tr, or with --init the init head's kind and projection)")
    p.add_argument("--proj-dim", "--dim", dest="proj_dim", type=_proj_dim,
                   help="TL-Tr/WA-Tr projection width, a multiple of 8 (default: the encoder width)")
    p.add_argument("--epochs", type=int_range(1, 100_000), default=30)
    p.add_argument("--lr", type=_lr, metavar="LR|auto",
                   help="learning rate; 'auto': pick it by a short search on the training clips (default: "
                        "the head kind's own measured rate, Head.lr: BENCHMARKS.md, 'Default training recipe')")
    p.add_argument("--batch-size", type=int_range(1, 1 << 20),
                   help=f"global batch (default: {BATCH}, or fewer on small sets so that an epoch takes at "
                        f"least {MIN_STEPS} steps: training clips // {MIN_STEPS})")
    p.add_argument("--mixup", type=float_range(0, 1), default=0.5, help="mixup probability per clip (0 = off)")
    p.add_argument("--time-mask", type=int_range(0, 100_000), default=10, help="mask up to N frames (same on all layers)")
    p.add_argument("--feature-mask", type=int_range(0, 100_000), help="mask up to N feature dims (default off; width/10 with CR)")
    p.add_argument("--label-smoothing", type=float_range(0, 1, hi_open=True), default=0.1)
    p.add_argument("--balanced", action="store_true", help="sample clips by inverse class frequency")
    p.add_argument("--cr-views", type=int_range(1, 64), default=1, help="K augmented views per clip for consistency regularisation")
    p.add_argument("--cr-weight", type=float_range(0, 1e6), default=1.0)
    p.add_argument("--unlabeled-features", type=nonempty("cache path"), help="cache of unlabeled clips for semi-supervised CR")
    p.add_argument("--cr-unlabeled-weight", type=float_range(0, 1e6), default=1.0)
    p.add_argument("--unlabeled-ratio", type=int_range(1, 1000), default=4, help="unlabeled clips per labeled clip per step")
    p.add_argument("--parent-labels", action="store_true", help="also train on ontology ancestors")
    p.add_argument("--weight-average", type=_range, metavar="START:END",
                   help="average these epochs' weights into wa.pt (default: the second half)")
    p.add_argument("--init", metavar="HEAD|whisper-at|whisper-at-low", type=nonempty("head"),
                   help="start from a head: a head file (ours or an official at_model.* file), or whisper-at / "
                        "whisper-at-low, the official Whisper-AT head of the cache's Whisper model (downloaded "
                        "once). The body is kept; the output layer keeps the rows of the classes the init head "
                        "also has (same AudioSet id or name), the others start fresh")
    p.add_argument("--allow-policy-mismatch", action="store_true",
                   help="--init from a head trained on features of another input policy (an official head: pad30) "
                        "on a cache of this one; the fine-tuned head is a head of the cache's policy")
    p.add_argument("--probe-start", choices=("auto", "on", "off"), default="auto",
                   help="start each head as the linear probe of the layer an inner cross-validation on its "
                        "training clips picks, and keep that start untrained where a trial (a head trained on 4/5 "
                        "of the training clips from that start) scores lower on the other fifth than it (auto: on "
                        f"sets of {PROBE_START_MIN} to {PROBE_START_CLIPS} training clips, without --init; tl-tr "
                        "trains from its random start instead, in the run and in the trial, and has the trial only "
                        "where the training clips hold 5 a class)")
    add_device(p)
    p.add_argument("--seed", type=seed_int, default=0)
    add_out(p, "run folder: the heads (wa.pt, best.pt; with --folds one sub-folder per fold), last.pt for "
               "--resume, metrics.json, per_class.csv, curves.png, report.html", metavar="RUN_DIR")
    p.add_argument("--tensorboard", metavar="DIR", type=nonempty("folder"),
                   help="also log per-epoch loss, lr and held-out scores (per fold, and of the running weight "
                        "average) as TensorBoard events in DIR; watch with: tensorboard --logdir DIR")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt (same options; a fresh start if there is none)")
    return p


def main(argv=None) -> int:
    speak = os.environ.get("RANK", "0") == "0"  # under torchrun every rank runs this: rank 0 talks
    return run_command("wat-train", lambda: _main(argv, speak), interrupted="continue with --resume", speak=speak)


def _main(argv, speak: bool) -> int:
    p = parser()
    a = parse_args(p, argv)
    from wat.data.heads import HeadError, head_class

    from .loop import train

    if a.allow_policy_mismatch and a.init is None:   # it loosens --init's check only: alone it did nothing, silently
        p.error("--allow-policy-mismatch applies to --init only (a head trained on features of another policy)")
    try:
        if a.head is not None:
            head_class(a.head).check_dim(a.proj_dim)  # --proj-dim with a head kind that has no projection
    except HeadError as e:
        p.error(str(e))
    opts = TrainOptions(
        features=a.features, out=a.out, head=a.head, eval_features=a.eval_features, folds=a.folds,
        proj_dim=a.proj_dim, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, mixup=a.mixup, time_mask=a.time_mask,
        feature_mask=a.feature_mask, label_smoothing=a.label_smoothing, balanced=a.balanced,
        cr_views=a.cr_views, cr_weight=a.cr_weight, unlabeled_features=a.unlabeled_features,
        cr_unlabeled_weight=a.cr_unlabeled_weight, unlabeled_ratio=a.unlabeled_ratio,
        parent_labels=a.parent_labels, weight_average=a.weight_average, init=a.init,
        allow_policy_mismatch=a.allow_policy_mismatch, probe_start={"auto": None, "on": True, "off": False}[a.probe_start],
        device=a.device,
        seed=a.seed, resume=a.resume, tensorboard=a.tensorboard)
    final = train(opts)
    if speak:
        print(summary_text(final, a.out))
    return 0


def summary_text(final: dict, out) -> str:
    """A few readable lines; metrics.json in RUN_DIR has everything."""
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"
    m = final.get("metric", "score")
    if "best" in final:
        lines = [f"{m}: best epoch {final['best_epoch']} {f(final['best'])}, weight-averaged {f(final.get('wa'))}"]
    else:
        lines = ["no held-out clips (no --eval-features or --folds): nothing was scored"]
    for name, fold in final.get("folds", {}).items():
        lines.append(f"  {name}: best {f(fold['best'])}, weight-averaged {f(fold['wa'])}")
    kept = [name for name, r in final.get("probe_start", {}).items() if r["kept"] == "start"]
    if kept:
        lines.append(f"kept the probe start (it beat the trial's trained head on held-back clips) as wa.pt: {', '.join(kept)}")
    if final.get("mAUC") is not None:
        lines.append(f"mAUC {f(final['mAUC'])}, d' {f(final.get('d_prime'))}")
    folds = list(final.get("folds", {}))
    ckpt = f"{folds[0]}..{folds[-1]}/{{best,wa}}.pt" if folds else "best.pt, wa.pt"
    scored = ", per_class.csv" if "best" in final else ""
    lines.append(f"outputs in {out}: {ckpt}, metrics.json{scored}, curves.png, report.html")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
