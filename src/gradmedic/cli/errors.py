"""Turning library errors into one readable line and a non-zero exit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from rich.console import Console

from gradmedic.errors import GradmedicError

T = TypeVar("T")
_err = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a GradmedicError/ValueError/TypeError/FileNotFoundError as one line; exit 2."""
    try:
        yield
    except (GradmedicError, ValueError, TypeError, FileNotFoundError) as exc:
        _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def run_cli(fn: Callable[[], T]) -> T:
    """Call ``fn`` under :func:`user_errors`."""
    with user_errors():
        return fn()
