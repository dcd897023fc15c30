"""`WatError`: the base of every typed error a wat command reports as one `PROG: error: ...` line and
exit status 2 (`wat.data.clikit.main.run_command`). A module's own error class derives from it (and
from ValueError where callers catch that), so a command needs no list of error types to catch."""


class WatError(Exception):
    """Input or state that a wat command refuses, with a message for people (one line)."""
