"""A pytest plugin: the tests that cost the most CPU time, for sizing the suite on a shared machine.

`--durations` reports wall time, which on a loaded machine (8 engineers on 2 cores, the suite under
`nice -n 19`) says more about the load than about the test: one full run measured test_layers.py at
470 s of wall time where it needs 23 s of CPU. This plugin adds the CPU seconds (user + system) each
test's setup, call and teardown used, in this process and in the subprocesses it waited for, and
lists the most expensive tests at the end:

    PYTHONPATH=bench .venv/bin/python -m pytest -q tests -p pytest_cputime --cputime=25

in one process, without `-n` (under pytest-xdist each worker would keep its own tally and the
controller, which prints the list, would have none). Not part of `make test` (tests/conftest.py does
not load it)."""
import os
import resource

import pytest


def pytest_addoption(parser):
    parser.addoption("--cputime", type=int, default=25, metavar="N",
                     help="list the N tests that used the most CPU time (user + system, subprocesses included)")


def _cpu() -> float:
    # os.times: this process; RUSAGE_CHILDREN: subprocesses already waited for (a CLI run, torchrun)
    t = os.times()
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return t.user + t.system + c.ru_utime + c.ru_stime


_COST: dict[str, float] = {}


def _timed(item):
    start = _cpu()
    try:
        return (yield)
    finally:
        _COST[item.nodeid] = _COST.get(item.nodeid, 0.0) + _cpu() - start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _timed(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _timed(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    return (yield from _timed(item))


def pytest_terminal_summary(terminalreporter, config):
    n = config.getoption("cputime")
    if not _COST or n <= 0:
        return
    total = sum(_COST.values())
    terminalreporter.write_sep("=", f"most CPU time (user + system, subprocesses included): {total:.0f} s in all")
    for nodeid, s in sorted(_COST.items(), key=lambda kv: -kv[1])[:n]:
        terminalreporter.write_line(f"{s:8.1f}s cpu  {100 * s / total:4.1f}%  {nodeid}")
