"""The probe start (train/warmstart.py): a head begins as the linear probe of the layer an inner
cross-validation on its training clips picks, and the run keeps that start where a trial on the
training clips (trained on four fifths, scored on the held-back fifth) says it scores higher."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthetic_cache import synthetic_meta, write_synthetic_cache
from wat.data.cache import FeatureStore, open_cache
from wat.data.heads import build_head
from wat.data.labels import Vocabulary
from wat.train import cli
from wat.train.evaluation import predict
from wat.train.loop import TrainError, TrainOptions, train
from wat.train.warmstart import Start, groups_of, inner_split, start_weights

L, T, D, K, SIGNAL = 4, 6, 16, 4, 2   # layer SIGNAL alone carries the class


@pytest.fixture(scope="module")
def layer_cache(tmp_path_factory):
    """Single-label, K classes x 30 clips, 5 folds; only layer SIGNAL tells the classes apart (the
    others: louder noise, so the layer mean is a worse feature than that layer)."""
    n = 30 * K
    rng = np.random.default_rng(0)
    labels = [(i % K,) for i in range(n)]
    x = rng.normal(size=(n, L, T, D)) * 3.0 + rng.normal(size=(L, 1, D)) * 3.0   # each layer its own offset, as an encoder's
    means = rng.normal(size=(K, D)) * 1.5
    x[:, SIGNAL] = rng.normal(size=(n, T, D)) + means[[c for (c,) in labels]][:, None] + x[:, SIGNAL].mean((0, 1))
    meta = synthetic_meta(vocab=Vocabulary.from_names([f"c{k}" for k in range(K)]), multilabel=False,
                          n_layers=L, n_frames=T, dim=D)
    path = tmp_path_factory.mktemp("layers") / "feats.h5"
    write_synthetic_cache(path, meta, x.astype(np.float16), labels, folds=np.arange(n) % 5 + 1)
    return path


@pytest.fixture(scope="module")
def easy_cache(tmp_path_factory):
    """As `layer_cache`, but every layer tells the K classes apart (a random-start TL-Tr learns it in
    a few epochs, as the probe does)."""
    n = 30 * K
    rng = np.random.default_rng(1)
    labels = [(i % K,) for i in range(n)]
    means = rng.normal(size=(K, L, 1, D)) * 3.0
    x = rng.normal(size=(n, L, T, D)) + means[[c for (c,) in labels]]
    meta = synthetic_meta(vocab=Vocabulary.from_names([f"c{k}" for k in range(K)]), multilabel=False,
                          n_layers=L, n_frames=T, dim=D)
    path = tmp_path_factory.mktemp("easy") / "feats.h5"
    write_synthetic_cache(path, meta, x.astype(np.float16), labels, folds=np.arange(n) % 5 + 1)
    return path


def _setup(path, field="features"):
    cache = open_cache(path)
    y = cache.label_matrix().astype(bool)
    return cache, FeatureStore(cache, field), y


def test_inner_split_holds_back_one_training_fold_or_a_fifth_per_class():
    folds = np.repeat([1, 2, 3, 4, 5], 8)
    y = np.eye(4, dtype=bool)[np.arange(40) % 4]
    tr = np.flatnonzero(folds != 1)
    fit, held = inner_split(tr, folds, y, seed=0)
    assert sorted(np.concatenate([fit, held])) == sorted(tr) and not set(fit) & set(held)
    assert len(np.unique(folds[held])) == 1 and 1 not in folds[held]   # one training fold, never the eval fold
    no_folds = np.full(40, -1)
    fit, held = inner_split(np.arange(40), no_folds, y, seed=0)
    assert len(held) == 8 and (y[held].sum(0) == 2).all()               # a fifth of every class
    assert (groups_of(np.arange(40), no_folds, y, 0) == groups_of(np.arange(40), no_folds, y, 0)).all()


@pytest.mark.parametrize("kind", ["wa-mlp", "wa-tr", "tl-tr"])
def test_probe_start_picks_the_informative_layer_and_scores_like_its_probe(layer_cache, kind):
    cache, store, y = _setup(layer_cache, build_head(kind, L, D, K).__class__.field)
    torch.manual_seed(0)
    head = build_head(kind, L, D, K)
    tr, te = np.flatnonzero(cache.folds != 1), np.flatnonzero(cache.folds == 1)
    start = Start(head, store, tr, cache.folds, y, multilabel=False, seed=0)
    assert start.info["layer"] == SIGNAL and start.info.get("routed", True), start.info
    p = predict(head, store, te, multilabel=False)
    acc = (p.argmax(1) == y[te].argmax(1)).mean()
    assert acc >= 0.9, (kind, acc, start.info)
    if kind != "tl-tr":  # blocks are the identity: the head is that layer's probe, exactly
        m = torch.from_numpy(cache.read("mean", start.all_idx)[:, SIGNAL].astype(np.float64))
        z = F.layer_norm(m, (D,))
        mu, sd = z.mean(0), z.std(0, unbiased=False)
        w, b = start_weights((z - mu) / sd, y[start.all_idx], False)
        x = F.layer_norm(torch.from_numpy(cache.read("mean", te)[:, SIGNAL].astype(np.float64)), (D,))
        want = torch.softmax(((x - mu) / sd) @ w.T + b, 1).numpy()
        np.testing.assert_allclose(p, want, atol=2e-3)


def test_the_trial_fits_its_start_on_four_fifths_and_the_run_starts_from_all_clips(layer_cache):
    cache, store, y = _setup(layer_cache, "mean")
    torch.manual_seed(0)
    head = build_head("wa-mlp", L, D, K)
    tr = np.flatnonzero(cache.folds != 1)
    start = Start(head, store, tr, cache.folds, y, multilabel=False, seed=0)
    assert len(start.held_idx) == len(tr) // 4 and len(start.trial_idx) == len(tr) - len(start.held_idx)
    assert torch.equal(head.mlp_layer[1].weight, start.start.mlp_layer[1].weight)   # the run's head: the start
    trial_head, info = start.trial_start(store)
    assert info["layer"] == SIGNAL == start.info["layer"]
    assert not torch.equal(trial_head.mlp_layer[1].weight, head.mlp_layer[1].weight)   # fitted on fewer clips
    assert start.initial is None
    with pytest.raises(RuntimeError, match="once"):   # handed over: the run keeps no spare copy of its head
        start.trial_start(store)
    torch.manual_seed(0)
    again, _ = Start(build_head("wa-mlp", L, D, K), store, tr, cache.folds, y, multilabel=False, seed=0).trial_start(store)
    assert all(torch.equal(a, b) for a, b in zip(trial_head.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("lr, kept", [(1e-2, "trained"), (30.0, "start")])
def test_the_trial_decides_what_wa_pt_holds_on_training_clips_only(layer_cache, tmp_path, monkeypatch, lr, kept):
    """The trial trains on the training clips less the held-back fifth, never the evaluation fold;
    the run's wa.pt is the trained head where the trained head ties or wins on the held-back clips
    (a separable problem: both score 1.0), the start of all training clips where it loses (a
    learning rate that wrecks the head)."""
    from wat.train import warmstart
    seen = []
    real = warmstart.side_run
    monkeypatch.setattr(warmstart, "side_run", lambda fit, *a: (seen.append(fit.train_idx), real(fit, *a))[1])
    final = train(TrainOptions(features=str(layer_cache), out=str(tmp_path), head="wa-mlp", folds=5, epochs=2,
                               lr=lr, progress=False))
    cache, store, y = _setup(layer_cache, "mean")
    assert len(seen) == 5
    for f in range(1, 6):
        rec = final["probe_start"][f"fold{f}"]
        assert rec["kept"] == kept, rec
        sc = rec["held_back_scores"]
        assert (sc["start"] > sc["trained"]) == (kept == "start") and rec["trial_clips"] == 72 and rec["held_back"] == 24
        idx = seen[f - 1]
        assert len(idx) == 72 and not (cache.folds[idx] == f).any()      # never the evaluation fold
        wa = torch.load(tmp_path / f"fold{f}" / "wa.pt", weights_only=True)["state_dict"]
        torch.manual_seed(0)
        want = build_head("wa-mlp", L, D, K)
        Start(want, store, np.flatnonzero(cache.folds != f), cache.folds, y, multilabel=False, seed=0)
        same = all(torch.equal(wa[k], v) for k, v in want.state_dict().items())
        assert same == (kept == "start"), f


def test_train_records_the_choice_per_fold_and_off_keeps_the_old_recipe(layer_cache, tmp_path):
    kw = dict(features=str(layer_cache), head="wa-mlp", folds=5, epochs=2, progress=False)
    final = train(TrainOptions(out=str(tmp_path / "on"), **kw))
    assert sorted(final["probe_start"]) == [f"fold{f}" for f in range(1, 6)]
    for rec in final["probe_start"].values():
        assert rec["layer"] == SIGNAL and rec["held_back"] == 24 and rec["kept"] in ("start", "trained")
    saved = json.loads((tmp_path / "on" / "metrics.json").read_text())["final"]["probe_start"]
    assert saved["fold1"]["kept"] == final["probe_start"]["fold1"]["kept"]
    off = train(TrainOptions(out=str(tmp_path / "off"), probe_start=False, **kw))
    assert "probe_start" not in off
    kw.update(head="last-mlp", epochs=1)   # a linear probe of the last layer already: no start by default
    assert "probe_start" not in train(TrainOptions(out=str(tmp_path / "last"), **kw))
    kw.update(head="tl-tr", proj_dim=8)      # trains from its random start, the probe start its trial's rival
    assert {r["trained_from"] for r in train(TrainOptions(out=str(tmp_path / "tl"), **kw))["probe_start"].values()} \
        == {"random"}
    on = train(TrainOptions(out=str(tmp_path / "tl-on"), probe_start=True, **kw))["probe_start"]
    assert {r["trained_from"] for r in on.values()} == {"start"}
    assert "probe_start" not in train(TrainOptions(out=str(tmp_path / "tl-off"), probe_start=False, **kw))


def test_tl_tr_has_no_trial_by_default_below_inner_k_training_clips_a_class(layer_cache, tmp_path, monkeypatch):
    """Where the held-back fifth cannot hold every class (96 training clips, 4 classes: under 30 a
    class here), TL-Tr trains from its random start with no trial; --probe-start on still has one."""
    from wat.train import warmstart
    monkeypatch.setattr(warmstart, "INNER_K", 30)
    kw = dict(features=str(layer_cache), head="tl-tr", proj_dim=8, folds=5, epochs=1, progress=False)
    assert "probe_start" not in train(TrainOptions(out=str(tmp_path / "auto"), **kw))
    assert train(TrainOptions(out=str(tmp_path / "on"), probe_start=True, **kw))["probe_start"]


def test_default_probe_start_per_head_kind_and_set():
    """By default WA heads train from the probe start from PROBE_START_MIN training clips; TL-Tr
    trains from its random start with the start its trial's rival where every split has INNER_K
    training clips a class; none on one layer, over PROBE_START_CLIPS, with --init, or for LastMLP."""
    from wat.train.options import PROBE_START_CLIPS, PROBE_START_MIN
    from wat.train.warmstart import INNER_K, default_probe_start
    n_cls = 11
    tl, wa = build_head("tl-tr", L, D, n_cls, proj_dim=8), build_head("wa-tr", L, D, n_cls)
    four, five = np.arange(4 * n_cls), np.arange(INNER_K * n_cls)
    assert default_probe_start(wa, L, n_cls, [four], False) == "start"
    assert default_probe_start(build_head("wa-mlp", L, D, n_cls), L, n_cls, [four], False) == "start"
    assert default_probe_start(tl, L, n_cls, [four], False) is None
    assert default_probe_start(tl, L, n_cls, [five, np.arange(88)], False) == "random"
    assert default_probe_start(tl, L, n_cls, [five, five[1:]], False) is None            # every split counts
    assert default_probe_start(tl, L, 4, [four], False) == "random"                       # 44 clips of 4 classes
    for head in (tl, wa):
        assert default_probe_start(head, 1, n_cls, [five], False) is None                 # one layer
        assert default_probe_start(head, L, n_cls, [five], True) is None                  # --init
        assert default_probe_start(head, L, n_cls, [np.arange(PROBE_START_CLIPS + 1)], False) is None
    assert default_probe_start(wa, L, n_cls, [np.arange(PROBE_START_MIN - 1)], False) is None
    assert default_probe_start(wa, L, n_cls, [np.arange(PROBE_START_MIN)], False) == "start"
    assert default_probe_start(build_head("last-mlp", L, D, n_cls), L, n_cls, [five], False) is None


@pytest.mark.parametrize("lr, kept", [(1e-2, "trained"), (30.0, "start")])
def test_tl_tr_trains_from_its_random_start_and_the_trial_weighs_that_against_the_probe_start(
        easy_cache, tmp_path, monkeypatch, lr, kept):
    """TL-Tr by default: the run is the run without a probe start (wa.pt bit for bit where the
    trained head is kept); the trial trains a head from the same random weights on four fifths of
    the training clips and keeps the start (fitted on all of them) only where the start scores
    higher on the held-back fifth (a separable problem: both score 1.0; a learning rate that wrecks
    the head: the start)."""
    from wat.train import warmstart
    from wat.train.state import seed_all
    began = []
    real = warmstart.side_run
    monkeypatch.setattr(warmstart, "side_run",
                        lambda fit, *a: (began.append(copy.deepcopy(fit.head.state_dict())), real(fit, *a))[1])
    kw = dict(features=str(easy_cache), head="tl-tr", proj_dim=8, folds=5, epochs=6, lr=lr, progress=False)
    final = train(TrainOptions(out=str(tmp_path / "auto"), **kw))
    off = train(TrainOptions(out=str(tmp_path / "off"), probe_start=False, **kw))
    seed_all(0)
    initial = [build_head("tl-tr", L, D, K, 8).state_dict() for _ in range(5)]   # the run's random heads, in order
    for f in range(1, 6):
        rec = final["probe_start"][f"fold{f}"]
        assert rec["trained_from"] == "random" and rec["kept"] == kept, rec
        assert (rec["held_back_scores"]["start"] > rec["held_back_scores"]["trained"]) == (kept == "start")
        assert all(torch.equal(initial[f - 1][k], v) for k, v in began[f - 1].items())   # the trial from random
        wa, wa_off = (torch.load(tmp_path / r / f"fold{f}" / "wa.pt", weights_only=True)["state_dict"]
                      for r in ("auto", "off"))
        same = all(torch.equal(wa[k], v) for k, v in wa_off.items())
        assert same == (kept == "trained"), f
        assert final["folds"][f"fold{f}"]["best"] == off["folds"][f"fold{f}"]["best"]   # the same training


def test_probe_start_refusals(layer_cache, tmp_path, capsys):
    with pytest.raises(TrainError, match="--init"):
        train(TrainOptions(features=str(layer_cache), out=str(tmp_path / "a"), init=str(tmp_path / "x.pt"),
                           probe_start=True, progress=False))
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["--features", str(layer_cache), "--out", str(tmp_path / "b"), "--probe-start", "maybe"])
    assert e.value.code == 2
    assert "--probe-start" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_probe_start_resumes_with_it_off():
    from wat.train.state import option_differences
    assert option_differences({"epochs": 30}, {"epochs": 30, "probe_start": False}) == []
    assert option_differences({"epochs": 30}, {"epochs": 30, "probe_start": None}) == ["--probe-start: False -> None"]


def test_resume_takes_the_trials_choice_from_last_pt_and_ends_as_an_uninterrupted_run(layer_cache, tmp_path,
                                                                                      monkeypatch):
    from wat.train import loop
    from wat.train.loop import Interrupted
    from wat.train.state import load_checkpoint, save_checkpoint
    kw = dict(features=str(layer_cache), head="wa-mlp", folds=5, epochs=2, progress=False)
    whole = train(TrainOptions(out=str(tmp_path / "whole"), **kw))
    with pytest.raises(Interrupted):
        train(TrainOptions(out=str(tmp_path / "cut"), max_epochs_this_run=1, **kw))
    ran = []
    monkeypatch.setattr(loop, "trial", lambda *a, **k: ran.append(1))
    again = train(TrainOptions(out=str(tmp_path / "cut"), resume=True, **kw))
    assert not ran and again["probe_start"] == whole["probe_start"]
    for f in range(1, 6):
        a, b = (torch.load(tmp_path / d / f"fold{f}" / "wa.pt", weights_only=True)["state_dict"] for d in ("whole", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    ck = load_checkpoint(tmp_path / "cut" / "last.pt")   # a last.pt of the first recipe: no trials in it
    del ck["trials"]
    ck["epoch"], ck["history"] = 1, ck["history"][:1]
    save_checkpoint(tmp_path / "cut" / "last.pt", ck)
    with pytest.raises(TrainError, match="no start trial"):
        train(TrainOptions(out=str(tmp_path / "cut"), resume=True, **kw))


def test_tl_tr_resumed_keeps_its_trials_choice_and_ends_as_an_uninterrupted_run(easy_cache, tmp_path, monkeypatch):
    """TL-Tr's default (random start, the probe start its trial's rival) through --resume: the trial is
    not run again, and every fold's wa.pt (the start or the trained head) is the uninterrupted run's."""
    from wat.train import loop
    from wat.train.loop import Interrupted
    kw = dict(features=str(easy_cache), head="tl-tr", proj_dim=8, folds=5, epochs=2, progress=False)
    whole = train(TrainOptions(out=str(tmp_path / "whole"), **kw))
    with pytest.raises(Interrupted):
        train(TrainOptions(out=str(tmp_path / "cut"), max_epochs_this_run=1, **kw))
    monkeypatch.setattr(loop, "trial", lambda *a, **k: pytest.fail("the trial ran again"))
    again = train(TrainOptions(out=str(tmp_path / "cut"), resume=True, **kw))
    assert again["probe_start"] == whole["probe_start"]
    assert {r["trained_from"] for r in again["probe_start"].values()} == {"random"}
    for f in range(1, 6):
        a, b = (torch.load(tmp_path / d / f"fold{f}" / "wa.pt", weights_only=True)["state_dict"] for d in ("whole", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a)
