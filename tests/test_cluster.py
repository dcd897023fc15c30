"""The dask driver: a LocalCluster of 2 worker processes writes the same cache as single-process mode."""
import sys

import numpy as np
import pytest

from wat.data.cache import open_cache
from wat.data.datasets import load_dataset
from wat.data.demo import make_demo
from wat.extract.pipeline import ERRORS, ExtractOptions, RunnerConflict, extract_dataset, get_model, shard_dir_for

pytest.importorskip("distributed")

OPTS = dict(model="tiny.en", policy="trim", clip_seconds=1.0, shard_size=4, batch_size=4, progress=False)


def test_local_cluster_matches_single_process(tmp_path):
    root = make_demo(tmp_path / "demo", clips_per_class=1, seed=1)  # 11 clips -> shards of 4, 4, 3
    ds = load_dataset("esc50", root)
    single = extract_dataset(ds, ExtractOptions(**OPTS), tmp_path / "single.h5", model=get_model("tiny.en", "cpu"))

    assert "distributed" in sys.modules  # imported by this test module, not by single-process mode
    from wat.extract.cluster import DaskRunner, connect

    with connect(local_workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        with pytest.raises(RunnerConflict, match="both a loaded model and a runner"):
            extract_dataset(ds, ExtractOptions(**OPTS), tmp_path / "x.h5", model=get_model("tiny.en", "cpu"),
                            runner=DaskRunner(client))
        dist = extract_dataset(ds, ExtractOptions(**OPTS), tmp_path / "dist.h5", runner=DaskRunner(client))
    assert dist.written == single.written == 11 and dist.shards == 3 and not dist.errors
    a, b = open_cache(tmp_path / "single.h5"), open_cache(tmp_path / "dist.h5")
    assert a.meta == b.meta
    assert list(a.ids) == list(b.ids) and a.labels == b.labels and list(a.folds) == list(b.folds)
    fa, fb = a.read("features", np.arange(11)), b.read("features", np.arange(11))
    np.testing.assert_allclose(fa.astype(np.float32), fb.astype(np.float32), rtol=1e-3,
                               atol=1e-3 * np.abs(fa.astype(np.float32)).max())
    assert (shard_dir_for(tmp_path / "dist.h5") / ERRORS).read_text() == "id\tpath\treason\n"


def test_single_process_mode_does_not_import_dask(tmp_path):
    import subprocess

    root = make_demo(tmp_path / "demo", clips_per_class=1, seed=2)
    code = ("import sys\nfrom wat.data.datasets import load_dataset\n"
            "from wat.extract.pipeline import ExtractOptions, extract_dataset\n"
            f"ds = load_dataset('esc50', {str(root)!r}); ds.clips = ds.clips[:2]\n"
            f"extract_dataset(ds, ExtractOptions(**{OPTS!r}), {str(tmp_path / 'f.h5')!r})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
