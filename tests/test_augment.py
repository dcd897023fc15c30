import math

import pytest
import torch

from wat.train import augment


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_label_smoothing_values():
    y = torch.tensor([[1.0, 0, 0, 1]])
    assert torch.allclose(augment.smooth_targets(y, 0.1), torch.tensor([[0.9, 0.025, 0.025, 0.9]]))
    one = torch.tensor([[0.0, 1, 0, 0]])
    s = augment.smooth_targets(one, 0.2, multilabel=False)  # (1-e)*onehot + e/C, rows sum to 1
    assert torch.allclose(s, torch.tensor([[0.05, 0.85, 0.05, 0.05]]))
    assert torch.equal(augment.smooth_targets(y, 0.0), y)


def test_mixup_mixes_features_and_targets_with_the_same_lambda():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 2).contiguous()
    y = torch.eye(4)
    xm, ym, lam, partner = augment.mixup_(x.clone(), y, 1.0, gen(3))
    for i in range(4):
        j, l = int(partner[i]), float(lam[i])
        assert torch.allclose(xm[i], torch.full((2, 3, 2), l * i + (1 - l) * j))
        want = l * y[i] + (1 - l) * y[j]
        assert torch.allclose(ym[i], want)
    assert ((lam > 0) & (lam < 1)).all()
    # probability 0: nothing changes
    x0, y0, lam0, _ = augment.mixup_(x.clone(), y, 0.0, gen(3))
    assert torch.equal(x0, x) and torch.equal(y0, y) and (lam0 == 1).all()


def test_mixup_lambda_is_beta_10_10_and_reproducible():
    lam = augment.beta(20000, 10, 10, gen(0))
    assert abs(lam.mean().item() - 0.5) < 0.005
    assert abs(lam.var().item() - 100 / (400 * 21)) < 0.001  # ab/((a+b)^2 (a+b+1))
    assert torch.equal(augment.beta(5, 10, 10, gen(7)), augment.beta(5, 10, 10, gen(7)))
    use = sum(float((augment.mixup_(torch.zeros(100, 1, 1, 1), torch.zeros(100, 2), 0.5, gen(s))[2] < 1).float().mean())
              for s in range(20)) / 20
    assert abs(use - 0.5) < 0.05


def test_time_mask_is_one_block_shared_by_all_layers():
    x = torch.ones(64, 3, 25, 4)
    m = augment.time_mask_(x.clone(), 10, gen(1))
    zero = (m == 0)
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # same frames on every layer
    assert torch.equal(zero, zero[..., :1].expand_as(zero))  # whole frames
    frames = zero[:, 0, :, 0]
    widths = frames.sum(1)
    assert 7 <= widths.max() <= 10 and widths.min() <= 2
    for row in frames:  # contiguous
        idx = torch.nonzero(row).flatten()
        if len(idx):
            assert idx[-1] - idx[0] + 1 == len(idx)
    assert len({tuple(r.tolist()) for r in frames}) > 10  # differs between clips
    assert torch.equal(augment.time_mask_(x.clone(), 0, gen(1)), x)


def test_feature_mask_blocks_dims_everywhere():
    x = torch.ones(8, 2, 5, 32)
    m = augment.feature_mask_(x, 6, gen(2))
    zero = m == 0
    assert torch.equal(zero, zero[:, :1, :1].expand_as(zero))
    assert zero[:, 0, 0].sum(1).max() <= 6
    mean = augment.feature_mask_(torch.ones(8, 2, 32), 6, gen(2))  # time-mean input, same draws
    assert torch.equal(mean == 0, zero[:, :, 0])


def test_consistency_loss_hand_computed():
    a = torch.tensor([[0.0, 2.0]])
    b = torch.tensor([[1.0, -1.0]])

    def bce(p, q):
        return -(q * math.log(p) + (1 - q) * math.log(1 - p))

    sa, sb = torch.sigmoid(a)[0].tolist(), torch.sigmoid(b)[0].tolist()
    ab = (bce(sa[0], sb[0]) + bce(sa[1], sb[1])) / 2  # view a against stop-grad b
    ba = (bce(sb[0], sa[0]) + bce(sb[1], sa[1])) / 2
    assert augment.consistency_loss([a, b]).item() == pytest.approx((ab + ba) / 2, rel=1e-6)
    # three views: mean over the 6 ordered pairs
    c = torch.tensor([[-0.5, 0.5]])
    pairs = [(x, y) for x in (a, b, c) for y in (a, b, c) if x is not y]
    want = sum(augment.consistency_loss([x, y]).item() * 2 for x, y in pairs) / 12
    assert augment.consistency_loss([a, b, c]).item() == pytest.approx(want, rel=1e-6)


def test_consistency_loss_stops_gradient_through_targets():
    a = torch.tensor([[0.3, -1.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.5]], requires_grad=True)
    augment.consistency_loss([a, b]).backward()
    pa, pb = torch.sigmoid(a.detach()), torch.sigmoid(b.detach())
    # d/dz BCE(sigmoid(z), q) = sigmoid(z) - q; each view is a prediction in one of the 2 ordered pairs
    assert torch.allclose(a.grad, (pa - pb) / 2 / 2)
    assert torch.allclose(b.grad, (pb - pa) / 2 / 2)
    # identical views: zero loss gradient
    z = torch.tensor([[0.2, 0.1]], requires_grad=True)
    augment.consistency_loss([z, z * 1]).backward()
    assert torch.allclose(z.grad, torch.zeros(1, 2))


def test_consistency_loss_single_label():
    a, b = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 0.5, 0.0]])
    pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
    want = (-(pb * pa.log()).sum() - (pa * pb.log()).sum()) / 2
    assert augment.consistency_loss([a, b], multilabel=False).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError):
        augment.consistency_loss([a])


# ------------------------------------------------ in place == the out-of-place formulas they replaced

def ref_mixup(x, targets, prob, generator, alpha=10.0):
    """mixup as it was written out of place (a gathered copy and a new result)."""
    n = x.shape[0]
    lam = augment.beta(n, alpha, alpha, generator)
    use = torch.rand(n, generator=generator) < prob
    partner = torch.randint(0, n, (n,), generator=generator)
    lam = torch.where(use, lam, torch.ones_like(lam))
    lx = lam.to(x.device).view((n,) + (1,) * (x.dim() - 1))
    ly = lam.to(targets.device).view(n, 1)
    p = partner.to(x.device)
    x = x.float()
    x = torch.lerp(x[p], x, lx)
    targets = ly * targets.float() + (1 - ly) * targets[p.to(targets.device)].float()
    return x, targets, lam, partner


def ref_time_mask(x, max_width, generator):
    if max_width <= 0:
        return x
    m = augment._block_mask(x.shape[0], x.shape[2], max_width, generator).to(x.device)
    return x.masked_fill(m[:, None, :, None], 0)


def ref_feature_mask(x, max_width, generator):
    if max_width <= 0:
        return x
    m = augment._block_mask(x.shape[0], x.shape[-1], max_width, generator).to(x.device)
    return x.masked_fill(m.view((x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)), 0)


@pytest.mark.parametrize("shape", [(12, 3, 7, 37), (9, 2, 53), (5, 4, 25, 64)])
@pytest.mark.parametrize("prob", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("chunk", [augment.MIX_CHUNK_BYTES, 1000])
def test_mixup_in_place_equals_the_out_of_place_formula(shape, prob, chunk, monkeypatch):
    """Same seed -> bit-equal features, targets, lam and partners, the generator left in the same
    state; rows of odd widths exercise the vectorised kernels' tails; x is written in place, the
    mixed rows read in one chunk or one row at a time."""
    monkeypatch.setattr(augment, "MIX_CHUNK_BYTES", chunk)
    for seed in range(4):
        x = torch.randn(shape, generator=gen(100 + seed)) * 3
        y = (torch.rand(shape[0], 5, generator=gen(200 + seed)) < 0.3).float()
        g_ref, g_new = gen(seed), gen(seed)
        want = ref_mixup(x.clone(), y, prob, g_ref)
        buf = x.clone()
        got = augment.mixup_(buf, y, prob, g_new)
        assert got[0].data_ptr() == buf.data_ptr()  # written into the batch handed over
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert torch.equal(g_ref.get_state(), g_new.get_state())
        if prob:
            assert not torch.equal(buf, x)
    # an f16 batch is mixed into an f32 copy: the caller's tensor is left as it was
    x16 = torch.randn(shape, generator=gen(5)).half()
    keep = x16.clone()
    got, want = augment.mixup_(x16, y, 0.5, gen(1)), ref_mixup(x16, y, 0.5, gen(1))
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0]) and torch.equal(x16, keep)


def test_masks_in_place_equal_the_out_of_place_formulas():
    for seed in range(4):
        x = torch.randn(10, 3, 25, 40, generator=gen(seed))
        for width in (0, 4, 10, 30):
            g_ref, g_new = gen(seed), gen(seed)
            want = ref_feature_mask(ref_time_mask(x, width, g_ref), width // 2, g_ref)
            buf = x.clone()
            got = augment.feature_mask_(augment.time_mask_(buf, width, g_new), width // 2, g_new)
            assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want)
            assert torch.equal(g_ref.get_state(), g_new.get_state())
        mean = x.mean(2)
        g_ref, g_new = gen(seed), gen(seed)
        assert torch.equal(augment.feature_mask_(mean.clone(), 7, g_new), ref_feature_mask(mean, 7, g_ref))
