"""Peak memory of the multi-label probe fit (`wat.eval.logistic.fit_logistic`) against its bound.

One fresh process per case: random features [N, D] and K rare-to-common classes, the fit run with
`--block-bytes`, the peak RSS above what x, y and the loaded libraries hold (VmHWM after resetting
it through /proc/self/clear_refs, Linux) printed in float32 [K, N] arrays and against the bound
`block_bytes` (WORK_ARRAYS arrays per class block). Arrays above 32 MB are mapped and unmapped by
malloc, so RSS follows what is alive. Then the same formula at AudioSet-2M shape.

    python bench/probe_memory.py                      # 2.5M clips x 8 classes: all at once, blocks of 4
    python bench/probe_memory.py --clips 1000000 --classes 16 --block-classes 16,4
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CASE = """
import sys, numpy as np, torch
from wat.eval.logistic import fit_logistic
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
n, d, k, block_bytes = (int(v) for v in sys.argv[1:5])
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
y = torch.from_numpy(rng.random((n, k)) < np.linspace(0.01, 0.3, k))
fit_logistic(x[:1000], y[:1000], 1.0)           # libraries loaded before the baseline
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")   # restart the peak (VmHWM) here
fit_logistic(x, y, 1.0, max_iter=20, block_bytes=block_bytes)
print(status("VmHWM:") - base)
"""


def main(argv=None) -> int:
    from wat.data.clikit.args import positive_int  # bad values: one error line
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=positive_int, default=2_500_000)
    p.add_argument("--dim", type=positive_int, default=2, help="feature width (the bound does not depend on it)")
    p.add_argument("--classes", type=positive_int, default=8)
    p.add_argument("--block-classes", default="8,4", help="classes per block to measure, comma-separated")
    a = p.parse_args(argv)
    from wat.eval.logistic import BLOCK_BYTES, MEMORY, WORK_ARRAYS, classes_per_block

    for per in (int(v) for v in a.block_classes.split(",")):
        budget = per * WORK_ARRAYS * 4 * a.clips
        out = subprocess.run([sys.executable, "-c", CASE, str(a.clips), str(a.dim), str(a.classes), str(budget)],
                             capture_output=True, text=True, check=True)
        peak = int(out.stdout.split()[0])
        arrays = peak / (4 * a.clips * min(per, a.classes))
        print(f"{a.clips} clips x {a.classes} classes, blocks of {per}: peak {peak / 2**20:.0f} MiB above x and y = "
              f"{arrays:.2f} [block, N] float32 arrays; bound {budget / 2**20:.0f} MiB ({WORK_ARRAYS} arrays): "
              f"{'within' if peak <= budget else 'OVER'}")
    n, k, d = 2_000_000, 527, 1280
    per = classes_per_block(n)
    kn = k * n * 4
    print(f"AudioSet-2M ({n} clips x {k} classes, D {d}): one [K, N] float32 array {kn / 1e9:.1f} GB; all classes at "
          f"once {WORK_ARRAYS - 1} arrays = {(WORK_ARRAYS - 1) * kn / 1e9:.1f} GB; in blocks of {per} classes (default "
          f"block_bytes {BLOCK_BYTES / 2**30:.0f} GiB): <= {BLOCK_BYTES / 1e9:.2f} GB + L-BFGS pairs "
          f"{2 * MEMORY * per * (d + 1) * 4 / 1e6:.1f} MB, beside x {n * d * 4 / 1e9:.1f} GB and y {n * k / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
