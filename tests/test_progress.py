"""wat.data.clikit.progress and the reporting options every command shares (-v/--quiet/--progress)."""
import io
import logging

import pytest

from wat.data.clikit import progress as wprogress
from wat.data.cli import main as data_main
from wat.data.clikit.args import add_reporting, apply_reporting
from wat.data.clikit.progress import configure, progress


@pytest.fixture(autouse=True)
def _reset():
    yield
    configure("auto", wprogress.LOG_INTERVAL)
    logging.getLogger("wat").setLevel(logging.NOTSET)


def _run(n, **kw):
    for _ in progress(range(n), desc="work", unit="clip", **kw):
        pass


def test_log_mode_prints_complete_lines_with_rate_and_eta(capsys):
    configure("log", interval=0.0)
    _run(5)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and lines, err
    assert lines[-1].startswith("work: 5/5 clip (100%)") and "ETA" in lines[-1] and "clip/s" in lines[-1]


def test_log_mode_is_silent_for_loops_shorter_than_the_interval(capsys):
    configure("log", interval=3600)
    _run(50)
    assert capsys.readouterr().err == ""


def test_none_mode_and_library_disable_print_nothing(capsys):
    configure("none")
    _run(5)
    configure("log", interval=0.0)
    _run(5, disable=True)
    assert capsys.readouterr().err == ""


def test_auto_mode_logs_when_stderr_is_not_a_terminal(capsys):
    configure("auto", interval=0.0)
    _run(3)                      # pytest's captured stderr is not a TTY: log lines
    assert "work: 3/3" in capsys.readouterr().err


def test_quiet_silences_info_and_warnings_verbose_shows_info(capsys):
    import argparse
    p = argparse.ArgumentParser()
    add_reporting(p)
    log = logging.getLogger("wat.test")
    apply_reporting(p.parse_args(["-v"]))
    log.info("model from somewhere")
    assert "wat.test: INFO: model from somewhere" in capsys.readouterr().err
    apply_reporting(p.parse_args(["--quiet"]))
    log.warning("fallback")
    _run(3)
    assert capsys.readouterr().err == ""
    apply_reporting(p.parse_args([]))
    log.info("hidden")
    log.warning("shown")
    assert capsys.readouterr().err.strip() == "wat.test: WARNING: shown"
    with pytest.raises(SystemExit):
        p.parse_args(["--progress", "sometimes"])


def test_every_command_has_the_reporting_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data_main(["--progress", "never", "demo", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--progress" in capsys.readouterr().err
    assert data_main(["-q", "demo", "--out", str(tmp_path / "d"), "--clips-per-class", "1"]) == 0
