"""wat-eval --table: Whisper-AT's Table 1 laid out from finished wat-train runs (nothing typed in)."""
import csv
import json

import numpy as np
import pytest

from test_probe import write_synthetic_cache
from wat.eval.cli import eval_main
from wat.train import cli as train_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """WA-MLP and TL-Tr on a 1-layer 'crepe-tiny' cache and on a 4-layer 'base' cache (same clips, 5 folds)."""
    root = tmp_path_factory.mktemp("t1")
    caches = {"crepe": write_synthetic_cache(root / "crepe", n=100, n_layers=1, dim=8, informative=0, model="crepe-tiny"),
              "base": write_synthetic_cache(root / "base", n=100, n_layers=4, dim=12, informative=2, model="base")}
    out = {}
    for enc, feats in caches.items():
        for head, extra in (("wa-mlp", []), ("tl-tr", ["--proj-dim", "16"])):
            run = root / f"{enc}-{head}"
            assert train_cli.main(["--features", str(feats), "--folds", "5", "--head", head, "--epochs", "2",
                                   "--device", "cpu", "--out", str(run), *extra]) == 0
            out[enc, head] = run
    return out


def test_table_rows_come_from_each_runs_metrics(runs, tmp_path, capsys):
    order = [runs["crepe", "wa-mlp"], runs["crepe", "tl-tr"], runs["base", "wa-mlp"], runs["base", "tl-tr"]]
    capsys.readouterr()
    assert eval_main(["--table", *map(str, order), "--out", str(tmp_path / "t")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["model", "head", "params", "synthetic", "accuracy", "(%)"]
    rows = list(csv.DictReader(open(tmp_path / "t" / "table.csv")))
    assert [(r["model"], r["head"]) for r in rows] == [("crepe-tiny (trim)", "WA-MLP"), ("crepe-tiny (trim)", "TL-Tr16"),
                                                       ("base (trim)", "WA-MLP"), ("base (trim)", "TL-Tr16")]
    for r, run in zip(rows, order):
        m = json.loads((run / "metrics.json").read_text())
        assert float(r["score"]) == pytest.approx(m["final"]["wa"], abs=1e-6) and int(r["params"]) == m["head"]["n_parameters"]
        assert r["dataset"] == "synthetic" and r["metric"] == "accuracy"
        folds = [f["wa"] for f in m["final"]["folds"].values()]
        assert float(r["std"]) == pytest.approx(float(np.std(folds)), abs=1e-6)
    # the paper's layout: the encoder named on its first row only, scores in % with the fold std
    md = (tmp_path / "t" / "table.md").read_text().splitlines()
    assert md[2].startswith("| crepe-tiny (trim) | WA-MLP |") and md[3].startswith("|  | TL-Tr16 |")
    assert md[4].startswith("| base (trim) | WA-MLP |")
    assert f"{100 * float(rows[0]['score']):.1f} ± {100 * float(rows[0]['std']):.1f}" in md[2]
    assert printed[1].startswith("crepe-tiny (trim)") and printed[2].lstrip().startswith("TL-Tr16")


def test_table_refusals(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    one = str(runs["base", "wa-mlp"])
    for args, match in [([str(empty)], "no metrics.json"), ([one, one], "same cell")]:
        assert eval_main(["--table", *args, "--out", str(tmp_path / "t")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("wat-eval: error: ") and match in err[0], err
    for argv in (["--table", one, "--features", "x.h5", "--out", str(tmp_path / "t")], ["--out", str(tmp_path / "t")]):
        with pytest.raises(SystemExit) as e:
            eval_main(argv)
        assert e.value.code == 2
