"""Turning errors into one readable line and a meaningful exit status.

Exit status of every command:

* ``0``: healthy / success;
* ``1``: findings (problems diagnosed, no repair accepted, an experiment failed);
* ``2``: bad usage or bad input (typer's own usage errors use 2 as well);
* ``3``: the user's code raised (a factory, its file, a model's forward);
* ``4``: gradmedic itself failed (a bug; ``--debug`` shows the traceback);
* ``130``: interrupted (Ctrl-C).

Errors are one line on stderr; ``gradmedic --debug ...`` or ``GRADMEDIC_DEBUG=1``
prints the full traceback before it.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from gradmedic.errors import (
    GradmedicError,
    UserCodeError,
    display_path,
    is_gradmedic_file,
    one_line,
    user_code_error,
)

T = TypeVar("T")
_err = Console(stderr=True)

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_USER_CODE = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130

#: click's error base class as typer raises it: click's own up to typer 0.2x, the copy typer
#: vendors after (which no longer installs click). Found through a public typer error class.
_CLICK_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)

#: Exceptions that carry their own exit status: passed through untouched.
_PASS_THROUGH: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort, _CLICK_ERROR)

_debug = False


def set_debug(flag: bool) -> None:
    """Turn tracebacks on or off (the root ``--debug`` option)."""
    global _debug
    _debug = bool(flag)


def debug_enabled() -> bool:
    """``--debug`` was given or ``GRADMEDIC_DEBUG`` is set to 1/true/yes/on."""
    env = os.environ.get("GRADMEDIC_DEBUG", "").strip().lower()
    return _debug or env in {"1", "true", "yes", "on"}


def _fail(exc: BaseException, message: str, code: int) -> NoReturn:
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code) from None


def _internal(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if is_gradmedic_file(f.filename)]
    where = f" in {display_path(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    hint = "" if debug_enabled() else "rerun with --debug for the traceback and "
    return f"gradmedic failed unexpectedly{where}: {one_line(exc)}; this is a bug: {hint}report it"


@contextmanager
def user_errors() -> Iterator[None]:
    """Print any error as one line on stderr and exit with its status (see the module doc).

    :class:`UserCodeError` exits 3; :class:`GradmedicError`, ``ValueError``,
    ``TypeError`` and ``OSError`` (bad arguments, missing or unreadable files) exit
    2; anything else is a bug in gradmedic and exits 4.
    """
    try:
        yield
    except _PASS_THROUGH:
        raise
    except KeyboardInterrupt as exc:
        _fail(exc, "interrupted", EXIT_INTERRUPTED)
    except UserCodeError as exc:
        _fail(exc, str(exc), EXIT_USER_CODE)
    except (GradmedicError, ValueError, TypeError, OSError) as exc:
        _fail(exc, str(exc), EXIT_USAGE)
    except Exception as exc:
        _fail(exc, _internal(exc), EXIT_INTERNAL)


@contextmanager
def user_code(
    files: Iterable[str | os.PathLike[str]] = (),
    *,
    source: str | None = None,
    model: Any = None,
    inputs: Any = None,
) -> Iterator[None]:
    """Re-raise what the user's code raised inside the block as a :class:`UserCodeError`.

    Errors of gradmedic's own (bad input, bugs) pass through unchanged; see
    :func:`gradmedic.errors.user_code_error` for how the two are told apart.
    """
    try:
        yield
    except _PASS_THROUGH:
        raise
    except Exception as exc:
        err = user_code_error(exc, user_files=files, source=source, model=model, inputs=inputs)
        if err is None or err is exc:
            raise
        raise err from exc


def run_cli(fn: Callable[[], T]) -> T:
    """Call ``fn`` under :func:`user_errors`."""
    with user_errors():
        return fn()
