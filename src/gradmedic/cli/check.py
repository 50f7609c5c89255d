"""``gradmedic check``: a preflight diagnosis of a model before training.

Exit status: 0 when healthy, 1 when there are findings (so a CI job can gate
on it, like a linter), 2 for bad arguments or input (a bad ``--input-shape``, a
target that does not name a factory), 3 when the user's code raised (the file,
the factory, or the model's forward on the batch).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gradmedic.cli.errors import user_errors

if TYPE_CHECKING:
    import torch

#: The largest random batch ``--input-shape`` may ask for (float32 bytes).
MAX_INPUT_BYTES = 2 * 2**30
#: ``--optimizer`` names and their torch classes.
OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


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


def optimizer_factory(
    name: str | None, lr: float | None, momentum: float | None
) -> Callable[[Iterable[Any]], torch.optim.Optimizer] | None:
    """``--optimizer sgd --lr 0.01 --momentum 0.9`` -> a factory ``params -> Optimizer`` (or None).

    Raises:
        ValueError: An unknown name, a non-positive or non-finite lr, a momentum
            outside [0, 1), or --lr/--momentum without --optimizer.
    """
    import torch

    if name is None:
        if lr is not None or momentum is not None:
            raise ValueError("--lr and --momentum need --optimizer (sgd, adam or adamw)")
        return None
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of sgd, adam, adamw, got {name!r}")
    if lr is None:
        raise ValueError(f"--optimizer {key} needs --lr, e.g. --lr 0.01")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a positive number like 0.01, got {lr:g}")
    kwargs: dict[str, float] = {"lr": lr}
    if momentum is not None:
        if key != "sgd":
            raise ValueError(
                f"--momentum is SGD's; {OPTIMIZERS[key]} uses betas (the default 0.9, 0.999)"
            )
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f"--momentum must be in [0, 1), e.g. 0.9, got {momentum:g}")
        kwargs["momentum"] = momentum
    return functools.partial(getattr(torch.optim, OPTIMIZERS[key]), **kwargs)


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
        optimizer: Annotated[
            str | None,
            typer.Option(
                "--optimizer",
                help="sgd, adam or adamw: also judge the training (trial steps on a copy, "
                "curvature vs the stability limit).",
            ),
        ] = None,
        lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
        momentum: Annotated[
            float | None, typer.Option("--momentum", help="SGD momentum, in [0, 1).")
        ] = None,
        trial_steps: Annotated[
            int, typer.Option("--trial-steps", help="Most trial steps (with --optimizer).")
        ] = 300,
        trial_batch: Annotated[
            int,
            typer.Option("--trial-batch", help="Examples per trial step: your batch size."),
        ] = 64,
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
            factory = optimizer_factory(optimizer, lr, momentum)
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
                diagnosis = check(
                    loaded.model,
                    inputs,
                    targets,
                    optimizer=factory,
                    trial_steps=trial_steps,
                    trial_batch=trial_batch,
                )
        if as_json:
            typer.echo(diagnosis.to_json())
        else:
            Console().print(diagnosis)
        raise typer.Exit(code=0 if diagnosis.healthy else 1)
