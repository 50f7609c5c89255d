"""The typer application; each command lives in its own module and registers itself."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

import gradmedic
from gradmedic.cli.errors import set_debug

app = typer.Typer(
    name="gradmedic",
    help="Find, explain and fix vanishing and exploding gradients in PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    epilog="Exit status: 0 healthy, 1 findings, 2 bad usage or input, 3 your code raised "
    "(its file, factory or forward; one line naming file:line, --debug for the traceback), "
    "4 a gradmedic bug.",
)

# One module per command; each defines ``register(app)``.
COMMANDS = (
    "gradmedic.cli.lab",
    "gradmedic.cli.check",
    "gradmedic.cli.theory",
    "gradmedic.cli.fix",
    "gradmedic.cli.report",
    "gradmedic.cli.run",
    "gradmedic.cli.remedies",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradmedic {gradmedic.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="On an error, print the full traceback (also: GRADMEDIC_DEBUG=1).",
        ),
    ] = False,
) -> None:
    """Find, explain and fix vanishing and exploding gradients in PyTorch."""
    set_debug(debug)


for _name in COMMANDS:
    try:
        importlib.import_module(_name).register(app)
    except ModuleNotFoundError as exc:  # a command whose module is not written yet
        if exc.name != _name:
            raise


def main() -> None:
    """Entry point of the ``gradmedic`` script (and of ``python -m gradmedic``)."""
    app(prog_name="gradmedic")
