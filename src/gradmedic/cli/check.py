"""``gradmedic check``: a preflight diagnosis of a model before training.

Exit status: 0 when healthy, 1 when there are findings (so a CI job can gate
on it, like a linter), 2 for bad arguments or input (a bad ``--input-shape``, a
target that does not name a factory), 3 when the user's code raised (the file,
the factory, or the model's forward on the batch).
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from gradmedic.cli.errors import user_errors

#: The largest random batch ``--input-shape`` may ask for (float32 bytes).
MAX_INPUT_BYTES = 2 * 2**30


def parse_shape(text: str, max_bytes: int = MAX_INPUT_BYTES) -> tuple[int, ...]:
    """``"32,784"`` -> ``(32, 784)``; positive integers, at most ``max_bytes`` of float32."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise ValueError(
            f"--input-shape must be comma-separated positive integers like 32,784, got {text!r}"
        )
    size = math.prod(shape) * 4  # float32
    if size > max_bytes:
        raise ValueError(
            f"--input-shape {text} is a float32 batch of {size / 1e9:,.1f} GB; the limit is "
            f"{max_bytes / 2**30:g} GiB: pass a smaller shape (a batch of 8-64 samples is "
            "enough for a diagnosis)"
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
            shape = None if input_shape is None else parse_shape(input_shape)  # before any work
            loaded = load_target(target)
            inputs, targets = loaded.inputs, loaded.targets
            if shape is not None:
                gen = torch.Generator().manual_seed(seed)
                inputs, targets = torch.randn(shape, generator=gen), None
            if inputs is None:
                raise ValueError(
                    f"{target} gave a model but no batch: pass --input-shape (e.g. 32,784) or "
                    "return (model, inputs) from the factory"
                )
            with loaded.user_code(inputs=inputs):
                diagnosis = check(loaded.model, inputs, targets)
        if as_json:
            typer.echo(diagnosis.to_json())
        else:
            Console().print(diagnosis)
        raise typer.Exit(code=0 if diagnosis.healthy else 1)
