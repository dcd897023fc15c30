"""Every numeric option of wat-train, wat-probe, wat-eval, wat-data, wat-tag and wat-robust (and
wat-extract's --workers) is checked at parse time (wat-cache has none; wat-extract's others are in
test_extract.py): 0, negative, NaN, inf and absurd values (where the option cannot take them) are one
`PROG: error:` line and exit 2, before any file or model is opened (issue 11 A2: `wat-eval --batch-size
-1` used to score uninitialised memory; `--workers 10**12` was accepted by every command)."""
import pytest

from wat.data.cli import main as data_main
from wat.eval.cli import eval_main, probe_main
from wat.extract.cli import main as extract_main
from wat.robust.cli import main as robust_main
from wat.tag.cli import main as tag_main
from wat.train.cli import main as train_main

HUGE = str(10**12)
BAD = ["0", "-1", "nan", "inf", "1e30", HUGE]

# command -> (main, prog, required argv, {option: values that are valid, so not tried as bad})
CLIS = {
    "wat-train": (train_main, "wat-train", ["--features", "f", "--out", "o"], {
        "--folds": {"0"}, "--proj-dim": set(), "--epochs": set(), "--lr": set(), "--batch-size": set(),
        "--mixup": {"0"}, "--time-mask": {"0"}, "--feature-mask": {"0"}, "--label-smoothing": {"0"},
        "--cr-views": set(), "--cr-weight": {"0"}, "--cr-unlabeled-weight": {"0"}, "--unlabeled-ratio": set(),
        "--seed": {"0"}, "--weight-average": set()}),
    "wat-probe": (probe_main, "wat-probe", ["--features", "f", "--out", "o"], {
        "--folds": set(), "--workers": set(), "--jobs": set(), "--C": {HUGE}, "--max-iter": set(), "--seed": {"0"}}),
    "wat-eval": (eval_main, "wat-eval", ["--features", "f", "--head", "h", "--out", "o"], {
        "--top-k": set(), "--threshold": {"0"}, "--batch-size": set()}),
    "wat-data": (data_main, "wat-data demo", ["demo", "--out", "o"], {
        "--clips-per-class": set(), "--seed": {"0"}}),
    "wat-data list": (data_main, "wat-data list", ["list", "--dataset", "esc50", "--root", "r"], {
        "--problems": {"0"}}),
    "wat-tag": (tag_main, "wat-tag", ["a.wav", "--model", "m", "--head", "h"], {
        "--time-res": set(), "--top-k": set(), "--threshold": {"0"}, "--keep-scores": {"0"}, "--temperature": {"0"},
        "--temperature_increment_on_fallback": set(), "--best_of": set(), "--beam_size": set()}),
    "wat-robust": (robust_main, "wat-robust", ["--speech", "s", "--noise-dataset", "esc50", "--noise-root", "n",
                                               "--model", "m", "--out", "o"], {
        "--noise-per-utterance": set(), "--seed": {"0"}, "--batch-size": set(), "--chunk-size": set(),
        "--workers": set(), "--jobs": set(), "--limit": {HUGE}}),  # a limit beyond the data means all of it
    "wat-extract": (extract_main, "wat-extract", ["--dataset", "esc50", "--root", "r", "--model", "m", "--out", "o"], {
        "--workers": set(), "--local-workers": set()}),
}
CASES = [(cli, opt, v) for cli, (_, _, _, opts) in CLIS.items() for opt, ok in opts.items() for v in BAD if v not in ok]
# values inside the range but still wrong for the option
CASES += [("wat-train", "--label-smoothing", "1"), ("wat-train", "--label-smoothing", "2"), ("wat-train", "--mixup", "5"),
          ("wat-train", "--time-mask", "-3"), ("wat-train", "--folds", "1"), ("wat-train", "--weight-average", "3:2"),
          ("wat-train", "--weight-average", "0:2"), ("wat-train", "--lr", "-inf"), ("wat-eval", "--threshold", "1.5"),
          ("wat-probe", "--C", "-inf"), ("wat-probe", "--folds", "1"), ("wat-eval", "--batch-size", "2.5"),
          ("wat-train", "--proj-dim", "12"), ("wat-probe", "--workers", "100000"), ("wat-eval", "--tune-folds", ""),
          ("wat-eval", "--tune-folds", " "), ("wat-eval", "--tune-folds", "1,,2"), ("wat-eval", "--tune-folds", "-1"),
          ("wat-eval", "--tune-folds", "x"), ("wat-tag", "--threshold", "1.5"), ("wat-tag", "--keep-scores", "-1")]
# wat-probe --layers: 'all' or blocks / START:STOP ranges; an empty item used to mean "all" ('') or nothing ('1,,2')
CASES += [("wat-probe", "--layers", v) for v in ("", " ", "1,,2", ",1", "1,", "-1", "0,-3", "a", "1.5", "nan",
                                                  "1e30", "all,1", "5:2", "3:3", ":0", "-1:4", "1:2:3", "0:x")]


def _one_error(run, argv, prog, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: argument "), err
    return errors[0]


@pytest.mark.parametrize("cli,option,value", CASES, ids=[" ".join(c) for c in CASES])
def test_bad_number_is_one_error_line(cli, option, value, capsys):
    run, prog, argv, _ = CLIS[cli]
    line = _one_error(run, argv + [option, value], prog, capsys)
    assert option in line


def test_eval_negative_batch_size_never_reaches_the_head(tmp_path, capsys):
    # the reported case: files that do not exist are never opened, the option is refused first
    _one_error(eval_main, ["--features", str(tmp_path / "none.h5"), "--head", str(tmp_path / "none.pt"),
                           "--out", str(tmp_path / "o"), "--batch-size", "-1"], "wat-eval", capsys)
    assert not (tmp_path / "o").exists()


def test_good_numbers_still_parse():
    from wat.data.clikit.args import float_range
    from wat.eval.cli import eval_parser, probe_parser
    from wat.train.cli import parser as train_parser
    a = train_parser().parse_args(["--features", "f", "--out", "o", "--lr", "3e-4", "--label-smoothing", "0",
                                   "--mixup", "1", "--folds", "5", "--weight-average", "2:2", "--seed", "4294967295"])
    assert (a.lr, a.label_smoothing, a.mixup, a.folds, a.weight_average) == (3e-4, 0, 1, 5, (2, 2))
    assert probe_parser().parse_args(["--features", "f", "--out", "o", "--C", "1e-3"]).C == 1e-3
    assert eval_parser().parse_args(["--features", "f", "--head", "h", "--out", "o", "--threshold", "1"]).threshold == 1
    assert float_range(0, 1)("0.25") == 0.25



def test_proj_dim_for_a_head_without_projection_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--features", str(tmp_path / "f.h5"), "--out", str(tmp_path / "o"), "--head", "wa-mlp",
                    "--proj-dim", "64"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("wat-train: error: --proj-dim 64: wa-mlp has no projection"), errors
    assert not (tmp_path / "o").exists()


def test_workers_are_capped_at_a_few_per_cpu(capsys):
    from wat.data.clikit.args import MAX_WORKERS
    line = _one_error(probe_main, ["--features", "f", "--out", "o", "--workers", str(MAX_WORKERS + 1)], "wat-probe", capsys)
    assert f"1..{MAX_WORKERS}" in line
    from wat.eval.cli import probe_parser
    assert probe_parser().parse_args(["--features", "f", "--out", "o", "--workers", str(MAX_WORKERS)]).workers == MAX_WORKERS


def test_allow_policy_mismatch_without_init_is_one_error_line(tmp_path, capsys):
    # it was accepted and ignored: a run the user believed fine-tuned across policies trained from scratch
    with pytest.raises(SystemExit) as e:
        train_main(["--features", str(tmp_path / "f.h5"), "--out", str(tmp_path / "o"), "--allow-policy-mismatch"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1 and "--init" in errors[0], errors
    assert not (tmp_path / "o").exists()
