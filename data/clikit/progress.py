"""One progress display for every long loop of the wat-* commands.

On a terminal it is a tqdm bar; in a batch log (stderr not a terminal: SLURM, nohup, CI) it is one
plain line at a steady interval — done/total, rate, ETA; nothing for loops shorter than that — instead of a bar redrawn with carriage
returns that a log file cannot show. The commands set the mode once from `--progress` (see
`wat.data.clikit.args`); library callers get `auto`.

    for x in progress(items, desc="extract", unit="clip"): ...
    with progress(total=n, desc="verify", unit="B", unit_scale=True) as bar: bar.update(k)
"""
from __future__ import annotations

import sys

from tqdm import tqdm

MODES = ("auto", "bar", "log", "none")
LOG_INTERVAL = 30.0  # seconds between two progress lines in `log` mode
_settings = {"mode": "auto", "interval": LOG_INTERVAL}


def configure(mode: str = "auto", interval: float | None = None) -> None:
    """Set the display for this process: auto (bar on a terminal, else log lines), bar, log or none."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    _settings["mode"] = mode
    if interval is not None:
        _settings["interval"] = float(interval)


class _Lines:
    """A file for tqdm that turns each redraw (`\\r` + status) into one complete line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, *, disable: bool | None = None, **kwargs) -> tqdm:
    """A tqdm over `iterable` (or a manual one: `total=`), shown as the configured mode says.
    `disable=True` (a library caller's own `progress=False`) hides it whatever the mode."""
    mode = _settings["mode"]
    if mode == "auto":
        stream = kwargs.get("file") or sys.stderr
        mode = "bar" if getattr(stream, "isatty", lambda: False)() else "log"
    if disable or mode == "none":
        return tqdm(iterable, disable=True, **kwargs)
    if mode == "bar":
        return tqdm(iterable, disable=False, **kwargs)
    kwargs.update(file=_Lines(kwargs.get("file") or sys.stderr), mininterval=_settings["interval"],
                  maxinterval=_settings["interval"], miniters=1, delay=_settings["interval"], ascii=True, dynamic_ncols=False, leave=True,
                  bar_format="{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, "
                             "elapsed {elapsed}, ETA {remaining}")
    return tqdm(iterable, disable=False, **kwargs)
