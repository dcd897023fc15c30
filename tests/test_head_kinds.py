"""Adding a head kind is one class: defining a `Head` subclass registers it for the trainer,
wat-eval and wat-tag (no list to edit anywhere else)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from wat.data import heads
from wat.data.heads import HEADS, Head, load_head
from wat.data.labels import Vocabulary
from synthetic_cache import synthetic_meta, write_synthetic_cache
from wat.eval.cli import eval_main
from wat.train.loop import TrainOptions, train


@pytest.fixture
def toy_kind():
    class LayerMax(Head):
        """Max over the layers of the time mean -> Linear: a toy, not a recipe."""

        kind, field = "toy-layer-max", "mean"

        def __init__(self, n_layers, dim_in, n_classes, proj_dim=None):
            super().__init__(n_layers)
            self.mlp_layer = nn.Linear(dim_in, n_classes)

        def forward(self, x):
            x = self._check(x, need_time=False)
            return self.mlp_layer((x.mean(2) if x.dim() == 4 else x).amax(1))

    yield LayerMax
    del HEADS["toy-layer-max"]


def test_a_registered_toy_head_trains_one_epoch_and_wat_eval_accepts_it(toy_kind, tmp_path, capsys):
    assert heads.head_field("toy-layer-max") == "mean" and HEADS["toy-layer-max"] is toy_kind
    rng = np.random.default_rng(0)
    vocab = Vocabulary.from_names(["a", "b", "c"])
    y = np.arange(60) % 3
    x = rng.normal(size=(60, 2, 4, 8)) + np.eye(3, 8)[y][:, None, None, :] * 3
    meta = synthetic_meta(vocab=vocab, multilabel=False, n_layers=2, n_frames=4, dim=8)
    write_synthetic_cache(tmp_path / "c" / "feats.h5", meta, x, [(int(c),) for c in y], folds=np.arange(60) % 5 + 1)

    final = train(TrainOptions(features=str(tmp_path / "c" / "feats.h5"), out=str(tmp_path / "run"), head="toy-layer-max",
                               eval_features=str(tmp_path / "c" / "feats.h5"), epochs=1, lr=1e-2, batch_size=16,
                               mixup=0.0, progress=False))
    assert final["metric"] == "accuracy" and final["best_epoch"] == 1
    head, info = load_head(tmp_path / "run" / "wa.pt")
    assert info.kind == "toy-layer-max" and isinstance(head, toy_kind)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["head"]["kind"] == "toy-layer-max"

    assert eval_main(["--features", str(tmp_path / "c" / "feats.h5"), "--head", str(tmp_path / "run" / "wa.pt"),
                      "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "60 clips" in out and "accuracy" in out
    # evaluated from the `mean` field it declared: the same probabilities as the head on the means
    pred = np.load(tmp_path / "ev" / "predictions.npz")["probs"].astype(np.float32)
    with torch.no_grad():
        p = torch.softmax(head(torch.from_numpy(x.mean(2).astype(np.float16).astype(np.float32))), -1).numpy()
    np.testing.assert_allclose(pred, p, atol=2e-3)


def test_a_head_kind_must_declare_a_known_field():
    with pytest.raises(heads.HeadError, match="features' or 'mean'"):
        class Bad(Head):
            kind, field = "toy-bad", "spectrogram"
    assert "toy-bad" not in HEADS


def test_the_kinds_the_commands_offer_are_the_registered_ones():
    """wat-train offers `BUILTIN_KINDS` (known without torch, for --help): the kinds kinds.py
    registers, in its order, each with its own default learning rate."""
    from wat.data.heads import BUILTIN_KINDS

    assert BUILTIN_KINDS == tuple(k for k, c in HEADS.items() if c.__module__ == "wat.data.heads.kinds")
    assert all(isinstance(HEADS[k].lr, float) and HEADS[k].lr > 0 for k in BUILTIN_KINDS)
