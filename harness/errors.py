"""Errors raised for bad input, and how a command turns failures into an exit status.

``InputError`` is a ``ValueError`` so callers can catch either."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable

DEBUG_ENV = "INFEMBED_DEBUG"
PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__))


class InputError(ValueError):
    """A bad argument, batch, loader or numerical state; the message names the problem."""


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warns from the first frame outside the harness package. A fixed ``stacklevel`` names the
    package's own code whenever the call goes through another of its layers (a subclass's
    ``fit``, a pipeline stage); the user's line is what the warning should show."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 2 is this function's caller
    while frame.f_back is not None and _in_package(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _in_package(filename: str) -> bool:
    return os.path.realpath(filename).startswith(PACKAGE_DIR + os.sep)


def exit_status(prefix: str, run: Callable[[], Any]) -> int:
    """Runs ``run()`` for a command and returns its exit status: 0 done (or ``run``'s own int);
    2 a bad input or an anticipated failure (one line ``PREFIX: error: ...`` on stderr); 130
    interrupted (Ctrl-C); 1 an internal error (one line; ``INFEMBED_DEBUG=1`` re-raises, which
    shows the traceback). Files are written atomically, so a failure leaves nothing half-written."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        result = run()
    except InputError as exc:
        if debug:
            raise
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted; nothing was half-written, and a rerun reuses what was cached", file=sys.stderr)
        return 130
    except OSError as exc:  # the environment: disk full, permissions, a vanished file
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prefix}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug of ours: say so in one line, and how to see the traceback
        if debug:
            raise
        print(f"{prefix}: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(please report it; {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
