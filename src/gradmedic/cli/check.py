"""``gradmedic check``: a preflight diagnosis of a model before training.

Exit status: 0 when healthy, 1 when there are findings (so a CI job can gate
on it, like a linter), 2 when the command could not run (bad arguments, a
factory that fails to load).
"""

from __future__ import annotations

from typing import Annotated

import typer

from gradmedic.cli.errors import user_errors


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32,784"`` -> ``(32, 784)``; every entry a positive integer."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise ValueError(
            f"--input-shape must be comma-separated positive integers like 32,784, got {text!r}"
        )
    return shape


def register(app: typer.Typer) -> None:
    """Add the ``check`` command to ``app``."""

    @app.command("check")
    def check_command(
        target: Annotated[
            str,
            typer.Argument(
                help="path/to/file.py:factory; the factory returns a model, "
                "(model, inputs) or (model, (inputs, targets))."
            ),
        ],
        input_shape: Annotated[
            str | None,
            typer.Option(
                "--input-shape",
                help="Shape of a random N(0, 1) batch, e.g. 32,784 (when the factory gives none).",
            ),
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed of the random batch.")] = 0,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the diagnosis as JSON.")
        ] = False,
    ) -> None:
        """Diagnose a model's gradients on one batch, before training (exit 1 on findings)."""
        import torch
        from rich.console import Console

        from gradmedic.cli.loading import load_target
        from gradmedic.preflight import check

        with user_errors():
            loaded = load_target(target)
            inputs, targets = loaded.inputs, loaded.targets
            if input_shape is not None:
                gen = torch.Generator().manual_seed(seed)
                inputs, targets = torch.randn(parse_shape(input_shape), generator=gen), None
            if inputs is None:
                raise ValueError(
                    f"{target} gave a model but no batch: pass --input-shape (e.g. 32,784) or "
                    "return (model, inputs) from the factory"
                )
            diagnosis = check(loaded.model, inputs, targets)
        if as_json:
            typer.echo(diagnosis.to_json())
        else:
            Console().print(diagnosis)
        raise typer.Exit(code=0 if diagnosis.healthy else 1)
