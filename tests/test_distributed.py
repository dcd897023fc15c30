"""wat-train under torchrun: 2 CPU processes (gloo) against one process with the same global batch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from wat.train.loop import Interrupted, TrainOptions, train

from test_train import multilabel

# Mixup and both masks on: the ranks draw for the whole global batch from one generator state and
# apply their clips' draws (mixup partners on the other rank read from the store), so one process and
# two see the same augmented clips in every global step and must agree to float tolerance (gradient
# sums in another order). 33 training clips in global batches of 16: the last step has one clip, so
# rank 1 takes part in it with an empty share.
OPTS = dict(head="tl-tr", proj_dim=16, epochs=3, lr=1e-3, batch_size=16, mixup=0.5, time_mask=2, feature_mask=3,
            seed=3)


def _argv(tr, te, out, resume=False):
    a = ["--features", str(tr), "--eval-features", str(te), "--head", "tl-tr", "--proj-dim", "16", "--epochs", "3",
         "--lr", "1e-3", "--batch-size", "16", "--mixup", "0.5", "--time-mask", "2", "--feature-mask", "3", "--seed", "3",
         "--out", str(out)]
    return a + ["--resume"] if resume else a


def _torchrun(argv):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "wat.train.cli", *argv], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _same(ref, run):
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
        assert ea["epoch"] == eb["epoch"]
        np.testing.assert_allclose([eb["train_loss"], eb["score"]], [ea["train_loss"], ea["score"]], rtol=1e-4)
    assert a["best"]["epoch"] == b["best"]["epoch"]
    np.testing.assert_allclose([b["final"]["best"], b["final"]["wa"]], [a["final"]["best"], a["final"]["wa"]],
                               rtol=1e-4)
    for name in ("best.pt", "wa.pt"):
        sa = torch.load(ref / name, weights_only=True)["state_dict"]
        sb = torch.load(run / name, weights_only=True)["state_dict"]
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)


def test_torchrun_two_processes_match_one_and_resume(tmp_path):
    tr, te = multilabel(tmp_path, "tr", 33, 1), multilabel(tmp_path, "te", 16, 2)
    train(TrainOptions(features=str(tr), eval_features=str(te), out=str(tmp_path / "one"), progress=False, **OPTS))
    with pytest.raises(Interrupted):  # one process stops after epoch 1 ...
        train(TrainOptions(features=str(tr), eval_features=str(te), out=str(tmp_path / "cut"), progress=False,
                           max_epochs_this_run=1, **OPTS))

    r = _torchrun(_argv(tr, te, tmp_path / "two"))
    assert r.stdout.count("outputs in") == 1  # one summary: rank 0 speaks
    _same(tmp_path / "one", tmp_path / "two")
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one").iterdir())  # one set of outputs, no per-rank files
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["processes"] == 1

    _torchrun(_argv(tr, te, tmp_path / "cut", resume=True))  # ... and two processes finish the run
    _same(tmp_path / "one", tmp_path / "cut")


def test_torchrun_probe_start_and_its_trial_match_one_process(tmp_path):
    """WA-Tr with the probe start: the start's fits and the trial run on every rank; two processes
    keep what one keeps and end with its weights."""
    tr, te = multilabel(tmp_path, "tr", 33, 1), multilabel(tmp_path, "te", 16, 2)
    argv = _argv(tr, te, tmp_path / "two")
    argv[argv.index("tl-tr")] = "wa-tr"
    argv += ["--probe-start", "on"]
    opts = {**OPTS, "head": "wa-tr", "probe_start": True}
    one = train(TrainOptions(features=str(tr), eval_features=str(te), out=str(tmp_path / "one"), progress=False, **opts))
    _torchrun(argv)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["final"]
    assert one["probe_start"]["main"]["held_back"] == 6 and two["probe_start"] == one["probe_start"]
    _same(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [12, 7])
def test_rank_shares_of_a_step_add_up_to_the_one_process_step(world, n):
    """In-process, every augmentation on (mixup with partners on other ranks, time and feature masks,
    CR views, unlabeled views): the gradients the ranks' shares backpropagate (what all_reduce_grads
    adds up and divides by the global count) equal one process's for the whole batch, also for a
    short last batch where ranks hold different numbers of clips."""
    from wat.data.heads import build_head
    from wat.train import augment
    from wat.train.step import Shares, StepConfig, _loss

    g = torch.Generator().manual_seed(0)
    L, T, D, C, U = 2, 6, 8, 3, 2 * n
    x = torch.randn((n, L, T, D), generator=g)
    y = (torch.rand(n, C, generator=g) < 0.4).float()
    u = torch.randn((U, L, T, D), generator=g)
    cfg = StepConfig(True, 3, 2, 0.7, 0.1, cr_views=2)
    torch.manual_seed(0)
    head = build_head("tl-tr", L, D, C, 8)

    def grads(loss):
        head.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in head.parameters()]

    lab, unl = _loss(head, x.clone(), y, cfg, torch.Generator().manual_seed(5), None, u.clone())
    one = grads(lab + unl)

    def partners(pos):
        return x[pos].clone(), augment.smooth_targets(y[pos], cfg.label_smoothing, cfg.multilabel)

    total = [torch.zeros_like(p) for p in head.parameters()]
    for rank in range(world):
        rows, urows = torch.arange(rank, n, world), torch.arange(rank, U, world)
        shares = Shares(augment.Share(rows, n), augment.Share(urows, U), partners)
        lab, unl = _loss(head, x[rows].clone(), y[rows], cfg, torch.Generator().manual_seed(5), None,
                         u[urows].clone(), shares)
        part = grads(lab * len(rows) + unl * (n * len(urows) / U))  # train_step's weighting
        total = [t + p for t, p in zip(total, part)]
    for a, b in zip(one, total):
        torch.testing.assert_close(b / n, a, rtol=1e-4, atol=1e-6)
