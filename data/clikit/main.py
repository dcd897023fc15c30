"""How every wat-* command ends: `run_command(prog, body)` runs the command's body and turns what it
raises into the one exit convention of the eight commands.

    typed error (`wat.data.errors.WatError`) or OSError    one `prog: error: ...` line, exit 2
    Ctrl-C (KeyboardInterrupt)                              one `prog: interrupted[; hint]` line, exit 130
    anything else                                           a traceback: a bug, never input"""
from __future__ import annotations

import sys
from typing import Callable

from ..errors import WatError


def error_line(prog: str, e: BaseException | str) -> str:
    """`prog: error: message` on one line (a message's own line breaks and runs of spaces folded)."""
    return f"{prog}: error: {' '.join(str(e).split()) or type(e).__name__}"


def run_command(prog: str, body: Callable[[], int], *, interrupted: str = "", speak: bool = True) -> int:
    """`body()` -> exit status, with wat's error convention (module doc). `interrupted`: what to do
    after Ctrl-C (e.g. "rerun the same command to resume"); `speak`: False silences both lines (the
    non-zero ranks of a torchrun job)."""
    try:
        return body()
    except (WatError, OSError) as e:
        if speak:
            print(error_line(prog, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if speak:
            print(f"{prog}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        return 130
