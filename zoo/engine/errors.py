"""Bad settings as one clear line: `error: <what> (raised at <file>:<line>)` and exit code 2, no traceback.

The zoo's own checks (a model argument out of range, a checkpoint that does not fit the data, a missing file)
raise ValueError / DataError / FileNotFoundError / IndexError with a message that names the problem and the fix.
Through jsonargparse such an error arrives wrapped in a 35-90-line traceback; `one_line_errors` finds the
innermost exception of the chain that the zoo itself raised (its raising frame lies in zoo/ or datamodules/)
and prints only that. Errors raised anywhere else (a bug, a library) keep their traceback.
Used by the `lightning` CLI, zoo.experiments.* and zoo.tools.*.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import datamodules

_ROOTS = (Path(__file__).resolve().parents[1], Path(datamodules.__file__).resolve().parent)
USER_ERRORS = (ValueError, FileNotFoundError, IndexError, NotADirectoryError, IsADirectoryError, PermissionError)


def _raised_at(e: BaseException) -> Path | None:
    tb = e.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve(), tb.tb_lineno


def zoo_error(e: BaseException) -> tuple[BaseException, str] | None:
    """The innermost exception in e's chain (e, its __cause__/__context__, ...) raised by the zoo's own code,
    with where it was raised (relative file:line); None when the chain holds none."""
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        where = _raised_at(e)
        if isinstance(e, USER_ERRORS) and where is not None:
            for root in _ROOTS:
                if where[0].is_relative_to(root):
                    found = (e, f"{where[0].relative_to(root.parent)}:{where[1]}")
        e = e.__cause__ or e.__context__
    return found


def format_error(e: BaseException) -> str | None:
    hit = zoo_error(e)
    if hit is None:
        return None
    err, where = hit
    from datamodules.errors import DataError
    text = str(err) if isinstance(err, DataError) else f"{err} (raised at {where})"
    return text.strip().strip("'\"") if isinstance(err, KeyError) else text.strip()


@contextmanager
def one_line_errors():
    """`with one_line_errors(): ...` in a command's main: the zoo's own errors print as `error: ...`, exit 2."""
    try:
        yield
    except USER_ERRORS as e:
        text = format_error(e)
        if text is None:
            raise
        print(f"\nerror: {text}", file=sys.stderr)
        raise SystemExit(2) from None
