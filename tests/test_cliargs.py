"""Shared CLI options: --device and --workers spelled, defaulted and refused the same way everywhere."""
import argparse

import pytest

from wat.data.clikit import args as cliargs
from wat.eval.cli import eval_parser, probe_main, probe_parser
from wat.extract.cli import main as extract_main
from wat.extract.cli import parser as extract_parser
from wat.tag.cli import build_parser as tag_parser
from wat.tag.cli import main as tag_main
from wat.train.cli import main as train_main
from wat.train.cli import parser as train_parser

REQUIRED = {
    "wat-extract": (extract_parser, ["--dataset", "esc50", "--root", "r", "--model", "m", "--out", "o"]),
    "wat-train": (train_parser, ["--features", "f", "--out", "o"]),
    "wat-probe": (probe_parser, ["--features", "f", "--out", "o"]),
    "wat-eval": (eval_parser, ["--features", "f", "--head", "h", "--out", "o"]),
    "wat-tag": (tag_parser, ["a.wav", "--model", "m", "--head", "h"]),
}


@pytest.mark.parametrize("name", REQUIRED)
def test_device_defaults_to_auto_and_accepts_every_form(name):
    make, argv = REQUIRED[name]
    assert make().parse_args(argv).device == "auto"
    for spec, want in [("cpu", "cpu"), ("CUDA", "cuda"), ("cuda:1", "cuda:1"), ("auto", "auto")]:
        assert make().parse_args(argv + ["--device", spec]).device == want


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "cuda:x", "", "nan"])
def test_bad_device_is_one_error_line(bad, capsys):
    with pytest.raises(SystemExit) as e:
        train_parser().parse_args(["--features", "f", "--out", "o", "--device", bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1].startswith("wat-train: error: argument --device")


def test_auto_resolves_and_missing_cuda_is_refused(capsys):
    assert cliargs.device_problem("auto")[1] is None
    assert cliargs.device_problem("cpu") == ("cpu", None)
    import torch
    if not torch.cuda.is_available():
        assert cliargs.device_problem("auto") == ("cpu", None)
        for run, argv in [(train_main, ["--features", "f", "--out", "o"]),
                          (extract_main, REQUIRED["wat-extract"][1]),
                          (probe_main, ["--features", "f", "--out", "o"]),
                          (tag_main, ["a.wav", "--model", "m", "--head", "h"])]:
            with pytest.raises(SystemExit) as e:
                run(argv + ["--device", "cuda:1"])
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2 and sum("error:" in line for line in err) == 1
            assert "error: --device cuda:1: CUDA is not available" in err[-1] and "Traceback" not in err[-1]


@pytest.mark.parametrize("flag", ["--workers", "--jobs"])
@pytest.mark.parametrize("value", ["0", "-3", "nan", "2.5", str(10**12)])
def test_worker_counts_refused_below_one_and_absurdly_high(flag, value, capsys):
    from wat.data.clikit.args import MAX_WORKERS
    with pytest.raises(SystemExit) as e:
        probe_parser().parse_args(["--features", "f", "--out", "o", flag, value])
    assert e.value.code == 2 and f"expected an integer in 1..{MAX_WORKERS}" in capsys.readouterr().err


def test_old_worker_spellings_are_hidden_aliases():
    assert probe_parser().parse_args(["--features", "f", "--out", "o", "--jobs", "3"]).workers == 3
    ex = REQUIRED["wat-extract"][1]
    assert extract_parser().parse_args(ex + ["--local-workers", "2"]).workers == 2
    assert extract_parser().parse_args(ex + ["--num-workers", "0"]).decode_workers == 0
    for make, hidden in [(probe_parser, "--jobs"), (extract_parser, "--local-workers")]:
        text = make().format_help()
        assert "--workers" in text and hidden not in text


def test_positive_int():
    assert cliargs.positive_int("4") == 4
    with pytest.raises(argparse.ArgumentTypeError):
        cliargs.positive_int("0")


def test_cliargs_number_types():
    assert cliargs.int_range(0, 3)("0") == 0 and cliargs.float_range(0, 1, hi_open=True)("0.5") == 0.5
    for parse, text in [(cliargs.int_range(0, 3), "4"), (cliargs.int_range(1), "x"), (cliargs.float_range(0, 1, hi_open=True), "1"),
                        (cliargs.float_range(0, 1), "nan"), (cliargs.float_range(0, float("inf")), "inf")]:
        with pytest.raises(Exception, match="expected"):
            parse(text)


# ------------------------------------------------------------------ the CLI kit: one list parser, one ending

def test_comma_list_one_rule():
    from wat.data.clikit.args import comma_list

    assert comma_list(" -10, 0,20.5", float) == (-10.0, 0.0, 20.5)
    assert comma_list("mean,concat") == ("mean", "concat")
    for text in ("", " ", "1,,2", "1,", ",1"):
        with pytest.raises(argparse.ArgumentTypeError, match="empty"):
            comma_list(text, float, what="number")
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not a number"):
        comma_list("1,x", float, what="number")


def test_a_list_starting_with_a_negative_number_is_a_value():
    from wat.robust.cli import parser

    for argv, want in ((["--snr", "-10,0"], (-10.0, 0.0)), (["--snr", "-5"], (-5.0,)), (["--snr=20,-10"], (20.0, -10.0))):
        a = cliargs.parse_args(parser(), ["--speech", "s", "--noise-dataset", "esc50", "--noise-root", "n",
                                          "--model", "tiny.en", "--out", "o", *argv])
        assert a.snr == want


COMMANDS = {"wat-data": "wat.data.cli:main", "wat-cache": "wat.data.cache_cli:main",
            "wat-extract": "wat.extract.cli:main", "wat-train": "wat.train.cli:main",
            "wat-probe": "wat.eval.cli:probe_main", "wat-eval": "wat.eval.cli:eval_main",
            "wat-tag": "wat.tag.cli:main", "wat-robust": "wat.robust.cli:main", "wat-xares": "wat.extract.xares.cli:main"}


@pytest.mark.parametrize("prog", sorted(COMMANDS))
@pytest.mark.parametrize("raised,status,line", [
    (KeyboardInterrupt(), 130, "interrupted"), ("typed", 2, "error: refused\n  here"), (OSError(28, "No space left"), 2, "error: ")])
def test_every_command_ends_the_same_way(prog, raised, status, line, monkeypatch, capsys):
    """Ctrl-C is exit 130, a typed error or an OSError one `prog: error: ...` line and exit 2, in all
    eight commands (raised where each parses its arguments)."""
    import importlib

    from wat.data.errors import WatError

    module, func = COMMANDS[prog].split(":")
    mod = importlib.import_module(module)
    exc = WatError("refused\n  here") if raised == "typed" else raised

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(mod, "parse_args", boom)
    assert getattr(mod, func)([]) == status
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: {line.split(chr(10))[0]}")
    if raised == "typed":
        assert err[0] == f"{prog}: error: refused here"


def _kit_parsers():
    from wat.extract.xares.cli import parser as xares_parser
    from wat.robust.cli import parser as robust_parser
    return {"wat-extract": extract_parser, "wat-train": train_parser, "wat-probe": probe_parser,
            "wat-eval": eval_parser, "wat-tag": tag_parser, "wat-robust": robust_parser, "wat-xares": xares_parser}


def _actions(p):
    """A parser's actions, its sub-commands' included."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _actions(sub)
        else:
            yield a


@pytest.mark.parametrize("prog", sorted(_kit_parsers()))
def test_model_out_features_are_the_kits_definitions(prog):
    """--model, --out and --features come from clikit.args (add_model / add_out / add_features) in every
    command that has them: one spelling and metavar per option, an empty value refused, and a help
    text of the command's own."""
    found = [a for a in _actions(_kit_parsers()[prog]()) if {"--model", "--out", "--features"} & set(a.option_strings)]
    assert found
    for a in found:
        assert a.type.__qualname__ == "nonempty.<locals>.parse", (prog, a.option_strings)
        assert a.metavar and a.help and len(a.option_strings) == 1


# options naming a file, folder or address besides --model/--out/--features: an empty value (an unset shell
# variable) is refused at parse time by the kit's `nonempty`, naming the option, instead of a puzzling
# "no such file" later or, for --scheduler and --output_dir, a silent fallback to local work or the current folder
PATH_OPTIONS = {"wat-extract": ("--root", "--manifest", "--scheduler"),
                "wat-train": ("--eval-features", "--unlabeled-features", "--init", "--tensorboard"),
                "wat-probe": ("--eval-features", "--scheduler"), "wat-eval": ("--head", "--table", "--tune-thresholds-on"),
                "wat-tag": ("audio", "--head", "--output_dir"), "wat-robust": ("--speech", "--noise-root", "--noise-manifest"),
                "wat-xares": ("--task", "--env-root", "encoder_py", "tasks_py")}


@pytest.mark.parametrize("prog", sorted(PATH_OPTIONS))
def test_path_options_refuse_an_empty_value(prog):
    found = {name: a for a in _actions(_kit_parsers()[prog]()) for name in (a.option_strings or [a.dest])}
    for name in PATH_OPTIONS[prog]:
        assert found[name].type.__qualname__ == "nonempty.<locals>.parse", (prog, name)


@pytest.mark.parametrize("main, argv, line", [
    (train_main, ["--features", "", "--out", "o"], "argument --features: an empty cache path"),
    (train_main, ["--features", "f", "--out", " "], "argument --out: an empty path"),
    (extract_main, ["--dataset", "esc50", "--root", "r", "--model", "", "--out", "o"], "argument --model: an empty model"),
    (tag_main, ["a.wav", "--model", ""], "argument --model: an empty model"),
    (probe_main, ["--features", "f", "--features", "", "--out", "o"], "argument --features: an empty cache path"),
    ("wat.data.cli:main", ["demo", "--out", ""], "argument --out: an empty path"),
    ("wat.data.cli:main", ["list", "--dataset", "esc50", "--root", " "], "argument --root: an empty dataset folder"),
    ("wat.data.cache_cli:main", ["info", ""], "argument file: an empty cache path"),
    ("wat.extract.xares.cli:main", ["run", "enc.py", ""], "argument tasks_py: an empty task file"),
    ("wat.eval.cli:eval_main", ["--table", "run", "", "--out", "o"], "argument --table: an empty run folder"),
    ("wat.robust.cli:main", ["--speech", "s", "--noise-dataset", "esc50", "--noise-root", "", "--model", "m", "--out", "o"],
     "argument --noise-root: an empty dataset folder"),
])
def test_an_empty_path_or_model_is_one_error_line(main, argv, line, capsys):
    if isinstance(main, str):
        import importlib
        module, func = main.split(":")
        main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith(line) and ": error: " in err[-1]


def test_kit_option_defaults_and_lists():
    p = argparse.ArgumentParser()
    cliargs.add_model(p, "m", default="base")
    cliargs.add_features(p, "f", repeat=True)
    cliargs.add_out(p, "o", metavar="DIR")
    a = p.parse_args(["--features", "a.h5", "--features", "b.h5", "--out", "x"])
    assert (a.model, a.features, a.out) == ("base", ["a.h5", "b.h5"], "x")
    assert not p._option_string_actions["--model"].required and p._option_string_actions["--out"].required
    with pytest.raises(ValueError, match="no default"):
        cliargs.add_model(argparse.ArgumentParser(), "m", default="base", repeat=True)


@pytest.mark.parametrize("script, argv, line", [
    ("init_from_head", ["--out", "o", "--seeds", "0,nan"], "argument --seeds: 'nan' is not a seed"),
    ("head_recipe", ["--out", "o", "--set", "mixup=nan"], "argument --set: 'mixup=nan' is not a TrainOptions override"),
    ("verify_speed", ["--clips", "-1"], "argument --clips: expected an integer >= 1, got -1"),
])
def test_bench_options_are_one_error_line(script, argv, line, monkeypatch, capsys):
    """The bench scripts' options go through the kit's types (bench/common.py: seeds, head kinds, --set
    overrides): a bad value is refused before any work (a traceback, or minutes of work, before)."""
    import importlib
    import sys
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"{script}.py: error: {line}")
