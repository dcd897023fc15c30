"""The training step augments its batch in place: the same inputs, losses and updates as the
out-of-place formulas it replaced, and no batch the readers still use is ever written."""
import numpy as np
import pytest
import torch

from wat.data.cache import open_cache
from wat.data.heads import build_head
from wat.data.cache.store import FeatureStore
from wat.train import augment, step
from wat.train.inputs import COMPUTE, batches
from wat.train.step import StepConfig, make_optimizer, train_step

from test_augment import ref_feature_mask, ref_mixup, ref_time_mask
from test_cache import C, D, L, N, T, make_meta, write_cache


def _old_views(parts, cfg, gen):
    """The views as they were built: a masked copy per view, concatenated (labeled, then unlabeled)."""
    def views(x, k):
        out = []
        for _ in range(k):
            v = ref_time_mask(x, cfg.time_mask, gen) if x.dim() == 4 else x
            out.append(ref_feature_mask(v, cfg.feature_mask, gen))
        return torch.cat(out) if k > 1 else out[0]
    xs = [views(x, k) for x, k, _share in parts]
    return torch.cat(xs) if len(xs) > 1 else xs[0]


def _run(monkeypatch, old: bool, kind, x, y, cfg, unlabeled):
    """One train_step (the old out-of-place augmentation when `old`): (loss, head input, params, batch after)."""
    with monkeypatch.context() as m:
        if old:
            m.setattr(augment, "mixup_", lambda x, y, p, g, alpha=10.0, share=None, partners=None:
                      ref_mixup(x, y, p, g, alpha))
            m.setattr(step, "_views", _old_views)
        torch.manual_seed(0)
        head = build_head(kind, L, D, C, 8 if kind == "tl-tr" else None)
        seen = []
        head.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
        opt = make_optimizer(head, 1e-3)
        batch = x.clone()
        loss = train_step(head, opt, batch, y, cfg, torch.Generator().manual_seed(7),
                          unlabeled=None if unlabeled is None else unlabeled.clone())
    return loss, seen[0], [p.detach().clone() for p in head.parameters()], batch


@pytest.mark.parametrize("kind, cr_views, with_unlabeled", [
    ("tl-tr", 1, False), ("tl-tr", 2, False), ("tl-tr", 1, True), ("tl-tr", 3, True), ("wa-mlp", 2, True)])
def test_step_in_place_equals_the_out_of_place_step(monkeypatch, kind, cr_views, with_unlabeled):
    """Same seed -> bit-equal head input, loss and updated weights, old path against new."""
    g = torch.Generator().manual_seed(1)
    shape = (12, L, T, D) if kind == "tl-tr" else (12, L, D)
    x = torch.randn(shape, generator=g)
    y = (torch.rand(12, C, generator=g) < 0.3).float()
    unlabeled = torch.randn((5,) + shape[1:], generator=g) if with_unlabeled else None
    cfg = StepConfig(True, 6 if kind == "tl-tr" else 0, 5, 0.5, 0.1, cr_views)
    old = _run(monkeypatch, True, kind, x, y, cfg, unlabeled)
    new = _run(monkeypatch, False, kind, x, y, cfg, unlabeled)
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
    assert all(torch.equal(a, b) for a, b in zip(old[2], new[2]))
    assert torch.equal(old[3], x)  # the old step left its batch as it was
    if cr_views == 1 and not with_unlabeled:  # the new one feeds the batch itself, mixed and masked
        assert torch.equal(new[3], new[1])


@pytest.fixture(scope="module", params=["fp16", "int8"])
def cache(tmp_path_factory, request):
    meta = make_meta(storage=request.param)
    index, _, _ = write_cache(tmp_path_factory.mktemp("cache"), meta=meta, sizes=(20, 20, 10))
    c = open_cache(index)
    return c, c.read("features", np.arange(N))  # the f16 values every reader returns


@pytest.mark.parametrize("field, streaming", [("features", True), ("features", False), ("mean", True)])
def test_steps_writing_into_batches_never_touch_a_batch_in_use(cache, field, streaming):
    """Batches as the trainer takes them (reused reader buffers when streaming rows, batches
    gathered from a window when streaming `mean`, a resident field otherwise), each written by a
    step's mixup and masks: every batch still arrives intact, the resident field is unchanged."""
    c, f16 = cache
    if field == "mean":
        f16 = c.read("mean", np.arange(N))
    budget = 100 if streaming else 1 << 30
    store = FeatureStore(c, field, memory_budget=budget, block_bytes=5 * L * T * D * 2, buffer_blocks=3)
    assert store.in_memory != streaming
    torch.manual_seed(0)
    head = build_head("tl-tr" if field == "features" else "wa-mlp", L, D, C, 8 if field == "features" else None)
    opt, gen = make_optimizer(head, 1e-3), torch.Generator().manual_seed(0)
    cfg = StepConfig(True, 10 if field == "features" else 0, 4, 1.0, 0.1)
    y = torch.zeros(4, C)
    order = np.random.default_rng(0).permutation(np.arange(N).repeat(3))
    ptrs = set()
    for idx, x in batches(store, order, 4, gen):
        assert x.dtype == COMPUTE and np.array_equal(x.half().numpy(), f16[idx])
        before = x.clone()
        ptrs.add(x.data_ptr())
        train_step(head, opt, x, y[:len(idx)], cfg, gen)
        assert not torch.equal(x, before)  # written in place: mixup of every clip
    if streaming and field == "features":  # the steps wrote into reused reader buffers (a few, reused many times)
        assert len(ptrs) <= 2 * store.read_threads + 2 < len(order) // 4
    if not streaming:
        assert np.array_equal(store.get(np.arange(N)).numpy(), f16)
