"""The errors a user's input can cause, and the one way a command line reports them.

Every command catches what it expects (these classes, OSError, ...) at its top and calls `report` (a `main` that
returns its exit status) or `exit_with` (one that does not): one line `error: <what, which file, which row>` on
stderr and exit status 2, never a traceback. The messages are written to be that line: each names the file and,
where there is one, the row or sample.
"""
from __future__ import annotations

import sys
from typing import NoReturn

BAD_INPUT = 2  # the exit status of a run refused for its input (argparse uses 2 for bad flags too)


class InputError(ValueError):
    """Input that cannot be used as given: an input list, a data file, a sample, a flag's value."""


class StoreError(ValueError):
    """An embedding store or shard that cannot be used as it is (changed, malformed, of another kind or width)."""


class UnsafePickleError(StoreError):
    """A pickle that asks for anything beyond plain data and numpy arrays."""


class AlignmentError(StoreError):
    """Alignment statistics that cannot be used (align_stats.json: not statistics, a statistic missing, of the wrong
    shape or not finite). A StoreError because the file is written beside the aligned store and read with it: a
    command that refuses a bad store refuses bad statistics the same way."""


def error_line(error: BaseException | str, prog: str | None = None) -> str:
    """`error: message` on one line (a message's own line breaks and runs of spaces become one space)."""
    line = "error: " + " ".join(str(error).split())
    return f"{prog}: {line}" if prog else line


def report(error: BaseException | str, code: int = BAD_INPUT, prog: str | None = None) -> int:
    """Print the error as one line on stderr and return `code`, for a `main` that returns its exit status.
    `prog`: prefix the line with the program's name, as argparse does for bad flags."""
    print(error_line(error, prog), file=sys.stderr)
    return code


def exit_with(error: BaseException | str, code: int = BAD_INPUT, prog: str | None = None) -> NoReturn:
    """`report`, then exit with `code` (no traceback, no chained exception)."""
    raise SystemExit(report(error, code, prog)) from None
