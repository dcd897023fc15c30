"""Many independent L2 logistic regressions fitted at once: sklearn's lbfgs path, batched over classes.

Class c's model is sklearn's `LogisticRegression(C=C, tol=tol, max_iter=max_iter)` (solver lbfgs)
on the column y[:, c]: minimise mean_i [log(1 + exp(z_i)) - y_i z_i] + ||w||^2 / (2 C N), z = x w + b.
sklearn's `OneVsRestClassifier` fits the classes one by one, each a scipy L-BFGS-B run whose every
function evaluation is two float64 matrix-vector products over [N, D]. This runs the same algorithm
for all classes together: the same start (w = 0, b = 0), memory (10 pairs), first step (length 1
along -g), strong-Wolfe line search (c1 = 1e-3, c2 = 0.9) and stop per class (max |gradient| <= tol,
or max_iter iterations). Each class therefore follows sklearn's path: the same iteration counts and
coefficients to float32 rounding. That matters beyond the optimum: at sklearn's tol the fits stop
early, and on few positives in many dimensions (AudioSet shape) the early stop scores a higher mAP
than the optimum does, so a probe that only reached the same optimum faster would not score the
same as sklearn.

Where the speed comes from (the arithmetic is sklearn's):
- all active classes share each product: [N, D] x [D, K] float32 matrix products instead of K
  float64 matrix-vector passes over the same memory;
- a class's line search moves along its margins a + t q (q = x d computed once per iteration), so
  trial steps cost no product: one iteration is two products, x d and r^T x, however many trials;
- a class leaves the active set when it stops, so the products shrink as classes converge.
Everything is class-major ([K, N] margins, [K, D] weights): dropping classes copies whole rows.

Memory: float32 [K, N] arrays are 4.2 GB each at AudioSet-2M (527 classes x 2M clips). The fit
holds 6 at once (labels, margins, the margin change q, the line search's accepted residuals, its
trial residuals and one temporary), 8 while a later line-search trial gathers the labels and q of
nearly every class (peak RSS measured in tests/test_probe.py: 6.0 or 8.0 arrays; it held 9-10
before temporaries were made in place and finished arrays let go). Classes are independent, so
`fit_logistic` fits them in blocks of `classes_per_block` classes, whose WORK_ARRAYS arrays fit
`block_bytes` (default 1 GiB: all 527 AudioSet classes at once up to 56k clips, 14 classes at 2M clips). Peak
beyond x [N, D] and y [N, K]: block_bytes, plus 2 x MEMORY x K x (D + 1) x 4 bytes of L-BFGS pairs
per block. Within a block each class's arithmetic is the same; a different block width changes only
the float32 rounding of the shared products (as a different BLAS thread count does).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # torch is imported where it is used: ProbeOptions reads the defaults below without it
    import numpy as np
    import torch

# The linear probe's hyper-parameters (ProbeOptions' defaults; the probe start of wat-train uses
# them as they are). TOL is sklearn's default stop, the one every probe figure so far was measured with.
DEFAULT_C = 1.0                   # inverse L2 strength (sklearn convention)
DEFAULT_MAX_ITER = 200            # lbfgs iterations at most
DEFAULT_TOL = 1e-4                # a fit stops when every entry of its gradient is below this

MEMORY = 10                       # L-BFGS correction pairs (scipy's default, used by sklearn)
C1, C2 = 1e-3, 0.9                # strong Wolfe constants of scipy's line search (dcsrch)
MAX_TRIALS = 50                   # line-search trials per iteration (sklearn's maxls)
WORK_ARRAYS = 9                   # [K, N] float32 arrays per class block: 8 alive at the worst + 1 of slack
BLOCK_BYTES = 1 << 30             # default bound of those arrays: a block of classes fits it


def _phi(r: torch.Tensor) -> torch.Tensor:
    """Per-class mean logistic loss from the residuals r = sigmoid(a) - y [K, N]: -log(1 - |r|) is
    softplus(a) - y a for y in {0, 1}, and reuses the sigmoid the slope needs anyway."""
    t = r.abs()
    return -t.neg_().log1p_().mean(1)               # in place: one temporary [K, N], not three


def classes_per_block(n: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Classes whose WORK_ARRAYS float32 [K, N] arrays fit `block_bytes` (at least one)."""
    return max(1, block_bytes // (WORK_ARRAYS * 4 * max(1, n)))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, C: float, tol: float = 1e-4, max_iter: int = 100,
                 block_bytes: int = BLOCK_BYTES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, D] float, y [N, K] {0, 1} -> (w [K, D], b [K], iterations [K]) of K logistic regressions,
    fitted in blocks of `classes_per_block(N, block_bytes)` classes (the memory bound, see above)."""
    import torch
    n, d = x.shape
    K = y.shape[1]
    dev = x.device
    x = x.to(torch.float32)
    w_out, b_out = torch.zeros(K, d, device=dev), torch.zeros(K, device=dev)
    it_out = torch.zeros(K, dtype=torch.long, device=dev)
    step = classes_per_block(n, block_bytes)
    for a in range(0, K, step):
        b = min(K, a + step)
        w_out[a:b], b_out[a:b], it_out[a:b] = _fit_block(x, y[:, a:b], C, tol, max_iter)
    return w_out, b_out, it_out


def fit_linear(x: "np.ndarray | torch.Tensor", y: "np.ndarray", multilabel: bool, *, C: float = DEFAULT_C,
               max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL, device=None
               ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """THE linear probe's fit (wat-probe's `linear` kind and wat-train's probe start): L2 logistic
    regression on x [N, D] (standardised by the caller) for labels y [N, K] {0, 1}; returns
    (W [K, D], b [K]) float32, scores = x W^T + b (softmax or sigmoid of them are the probabilities).

    - single-label (one 1 per row): sklearn's multinomial lbfgs fit on the CPU. A class absent from
      the rows gets W = 0 and b = -inf (probability 0); two classes present: sklearn's one binary row
      w as rows (0, w), whose softmax is sklearn's sigmoid; one class present: b = 0 for it.
    - multi-label: K independent fits, sklearn's one-vs-rest path batched over classes
      (`fit_logistic`, on `device`: None = x's)."""
    import warnings

    import numpy as np
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    xt = x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, np.float32))
    y = np.asarray(y)
    if multilabel:
        xt = xt.to(device or xt.device)
        w, b, _ = fit_logistic(xt, torch.from_numpy(y).to(xt.device), C, tol, max_iter)
        return w, b
    k = y.shape[1]
    t = y.argmax(1)
    present = np.unique(t)
    w = torch.zeros(k, xt.shape[1])
    b = torch.full((k,), float("-inf"))
    if len(present) == 1:      # nothing to separate: that class everywhere
        b[present[0]] = 0.0
        return w, b
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)   # a probe's stop, not a final model
        clf.fit(xt.cpu().numpy(), t)
    coef, icpt = clf.coef_, clf.intercept_
    if len(present) == 2:      # sklearn's binary form: one row, for the second class
        coef, icpt = np.stack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, icpt[0]])
    w[present] = torch.from_numpy(np.asarray(coef, np.float32))
    b[present] = torch.from_numpy(np.asarray(icpt, np.float32))
    return w, b


def _fit_block(x: torch.Tensor, y: torch.Tensor, C: float, tol: float, max_iter: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fit_logistic` of the K classes of y [N, K] all at once (x float32)."""
    import torch
    n, d = x.shape
    K = y.shape[1]
    dev, f32 = x.device, torch.float32
    lam = 1.0 / (C * n)
    w_out, b_out = torch.zeros(K, d, device=dev), torch.zeros(K, device=dev)
    it_out = torch.zeros(K, dtype=torch.long, device=dev)
    idx = torch.arange(K, device=dev)                  # active classes -> column of y
    yt = y.T.to(f32).contiguous()                      # [K, N]
    wb = torch.zeros(K, d + 1, device=dev)             # [w | b] of the active classes
    a = torch.zeros(K, n, device=dev)                  # margins x w + b
    r = torch.sigmoid(a) - yt                          # residuals (dloss/da * N)
    g = _grad(x, r, wb, lam)
    f = _phi(r)                                        # data loss; penalty added where needed
    del r                                              # [K, N] arrays not needed are let go (memory)
    s_hist = torch.zeros(MEMORY, K, d + 1, device=dev)
    y_hist = torch.zeros(MEMORY, K, d + 1, device=dev)
    rho = torch.zeros(MEMORY, K, device=dev)           # 0 = no pair (skipped update): no effect
    gamma = torch.ones(K, device=dev)                  # initial inverse Hessian scale s'y / y'y
    it, filled, slot = 0, 0, 0
    failed = torch.zeros(K, dtype=torch.bool, device=dev)   # line search found no decrease (scipy: ABNORMAL)
    while True:
        done = (g.abs().amax(1) <= tol) | (it >= max_iter) | failed
        if done.any():
            w_out[idx[done]], b_out[idx[done]], it_out[idx[done]] = wb[done, :d], wb[done, d], it
            keep = (~done).nonzero().squeeze(1)
            if not len(keep):
                break
            idx, wb, a, yt, g, f, gamma = (t.index_select(0, keep) for t in (idx, wb, a, yt, g, f, gamma))
            s_hist, y_hist, rho = (t.index_select(1, keep) for t in (s_hist, y_hist, rho))
        # two-loop recursion: p = -H g per class
        p, alphas = -g, []
        for j in range(filled):
            i = (slot - 1 - j) % MEMORY
            al = rho[i] * (s_hist[i] * p).sum(1)
            p = p - al[:, None] * y_hist[i]
            alphas.append((i, al))
        p = gamma[:, None] * p
        for i, al in reversed(alphas):
            be = rho[i] * (y_hist[i] * p).sum(1)
            p = p + (al - be)[:, None] * s_hist[i]
        t, q, r, f_new, failed = _line_search(x, yt, a, wb, p, g, f, lam, first=(it == 0))
        step = t[:, None] * p
        wb = wb + step
        a = a + t[:, None] * q
        del q
        g_new = _grad(x, r, wb, lam)
        del r
        dy = g_new - g
        sy, yy = (step * dy).sum(1), (dy * dy).sum(1)
        good = sy > torch.finfo(f32).eps * yy              # L-BFGS-B skips pairs without curvature
        s_hist[slot] = step * good[:, None]
        y_hist[slot] = dy * good[:, None]
        rho[slot] = torch.where(good, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        gamma = torch.where(good, sy / yy.clamp_min(1e-30), gamma)
        slot, filled = (slot + 1) % MEMORY, min(filled + 1, MEMORY)
        g, f = g_new, f_new
        it += 1
    return w_out, b_out, it_out


def _grad(x, r, wb, lam) -> torch.Tensor:
    """[K, D+1] gradient of mean loss + penalty (the intercept is not penalised, as in sklearn)."""
    import torch
    n, d = x.shape
    return torch.cat([r @ x / n + lam * wb[:, :d], r.mean(1, keepdim=True)], dim=1)


def _line_search(x, yt, a, wb, p, g, f0, lam, first: bool):
    """Per class, a step t along p meeting the strong Wolfe conditions, found on the margins.

    phi(t) = loss(a + t q) + lam/2 ||w + t p_w||^2 is convex in t; its slope brackets the step
    (too short: slope < -c2 |slope(0)|; too long: slope > c2 |slope(0)| or no sufficient decrease),
    then secant steps inside the bracket (safeguarded to its inner 80%), or extrapolation to at most
    4x without an upper end, as dcsrch does. Returns (t, residuals at t, data loss at t, failed).
    """
    import torch
    d = x.shape[1]
    k = len(wb)
    q = p[:, :d] @ x.T + p[:, d:]                            # [K, N] margin change per unit step
    wd, dd = (wb[:, :d] * p[:, :d]).sum(1), (p[:, :d] * p[:, :d]).sum(1)
    dphi0 = (g * p).sum(1)
    pen0 = 0.5 * lam * (wb[:, :d] * wb[:, :d]).sum(1)
    t = 1.0 / p.norm(dim=1) if first else torch.ones(k, device=x.device)   # L-BFGS-B's first step
    lo, dlo = torch.zeros_like(t), dphi0.clone()
    hi, dhi = torch.full_like(t, float("inf")), torch.zeros_like(t)
    t_ok, f_ok = torch.zeros_like(t), f0.clone()
    r_ok = torch.empty_like(a)
    active = torch.arange(k, device=x.device)
    for _ in range(MAX_TRIALS):
        ta = t[active]
        whole = len(active) == k                             # first trial: no gathering
        aa = (a + ta[:, None] * q) if whole else a[active] + ta[:, None] * q[active]
        ya, qa = (yt, q) if whole else (yt[active], q[active])
        ra = aa.sigmoid_().sub_(ya)                           # aa is a fresh array: in place
        del aa
        slope = (ra * qa).mean(1) + lam * (wd[active] + ta * dd[active])
        fa = _phi(ra)
        pen = pen0[active] + lam * (ta * wd[active] + 0.5 * ta * ta * dd[active])
        armijo = fa + pen <= f0[active] + pen0[active] + C1 * ta * dphi0[active]
        ok = armijo & (slope.abs() <= C2 * dphi0[active].abs())
        long_ = ~ok & (~armijo | (slope > 0))
        short = ~ok & ~long_
        acc = active[ok]
        t_ok[acc], f_ok[acc], r_ok[acc] = ta[ok], fa[ok], ra[ok]
        hi[active[long_]], dhi[active[long_]] = ta[long_], slope[long_]
        lo[active[short]], dlo[active[short]] = ta[short], slope[short]
        active = active[~ok]
        if not len(active):
            break
        l, h, dl, dh, tp = lo[active], hi[active], dlo[active], dhi[active], t[active]
        bracket = torch.isfinite(h)
        width = torch.where(bracket, h - l, torch.zeros_like(l))
        sec = l - dl * width / torch.where(dh > dl, dh - dl, torch.ones_like(dl))
        inner = torch.where(dh > dl, sec, l + 0.5 * width).clamp(l + 0.1 * width, h - 0.1 * width)
        slope0 = dphi0[active]
        ext = torch.where(dl > slope0, l - dl * l / (dl - slope0).clamp_min(1e-30), 4 * tp)
        t[active] = torch.where(bracket, inner, ext.clamp(1.1 * tp, 4 * tp))
    failed = torch.zeros(k, dtype=torch.bool, device=x.device)
    if len(active):   # no Wolfe point: the last sufficient decrease, or stop the class (scipy: ABNORMAL)
        t_ok[active] = lo[active]
        failed[active] = lo[active] == 0
        aa = a[active] + lo[active][:, None] * q[active]
        r_ok[active] = torch.sigmoid(aa) - yt[active]
        f_ok[active] = _phi(r_ok[active])
    return t_ok, q, r_ok, f_ok, failed
