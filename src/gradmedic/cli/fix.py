"""``gradmedic fix``: search for remedies under which a training setup trains healthily.

The target ``path/to/file.py:factory`` names a function taking no arguments that
returns a :class:`gradmedic.autorepair.Setup` (or a dict with its keys:
``model_factory`` (or ``model``), ``data``, ``loss_fn``, and optionally
``optimizer``, ``metric``, ``batch_size``).

Exit status: 0 when repaired or healthy, 1 when no candidate was accepted, 2
for bad arguments or input (a target that names no factory, a bad setup), 3 when
the user's code raised (the file, the factory, or training the original setup:
a model that does not fit its data).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from gradmedic.cli.errors import user_errors


def register(app: typer.Typer) -> None:
    """Add the ``fix`` command to ``app``."""

    @app.command("fix")
    def fix_command(
        target: Annotated[
            str,
            typer.Argument(
                help="path/to/file.py:factory; the factory returns a gradmedic.autorepair.Setup "
                "or a dict with model_factory, data, loss_fn (optional: optimizer, metric)."
            ),
        ],
        steps: Annotated[int, typer.Option(help="Training steps per candidate.")] = 200,
        seconds: Annotated[float, typer.Option(help="Wall-time cap per candidate.")] = 60.0,
        total_seconds: Annotated[
            float | None, typer.Option(help="Wall-time cap for the whole search.")
        ] = None,
        max_candidates: Annotated[
            int,
            typer.Option(
                help="Compute in full training runs: at most this x --steps training steps "
                "(successive halving spends them on many short runs and the best full ones)."
            ),
        ] = 12,
        seed: Annotated[int, typer.Option(help="Seed of every training run.")] = 0,
        strategy: Annotated[
            str, typer.Option(help="ranked (the diagnosis' remedies) or random (baseline).")
        ] = "ranked",
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Retrain with the diagnosis' remedies and print the best changes that fix the setup."""
        from rich.console import Console

        from gradmedic.autorepair import Budget, Setup, repair
        from gradmedic.autorepair.search import STRATEGIES
        from gradmedic.cli.loading import load_factory

        err = Console(stderr=True)
        with user_errors():
            budget = Budget(steps=steps, seconds=seconds, total_seconds=total_seconds)
            if strategy not in STRATEGIES:  # checked before the factory runs
                raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
            if max_candidates < 0:
                raise ValueError(f"--max-candidates must be >= 0, got {max_candidates}")
            factory = load_factory(target)
            setup = Setup.from_any(factory())
            with (
                _ProgressBar(err, max_candidates * steps, quiet=as_json) as report,
                factory.user_code(),
            ):
                result = repair(
                    setup,
                    budget=budget,
                    seed=seed,
                    max_candidates=max_candidates,
                    strategy=strategy,
                    progress=report,
                )
        if as_json:
            import json

            typer.echo(json.dumps(result.to_dict(), indent=2))
        else:
            out = Console()
            out.print(result.table())
            out.print(f"[bold]{result.message}[/]", highlight=False)
            if result.accepted is not None:
                out.print("\nPaste into your training script:\n")
                out.print(result.snippet, markup=False, highlight=False)
        raise typer.Exit(code=1 if result.status == "unrepaired" else 0)


class _ProgressBar:
    """A transient rich progress bar of training steps, fed by ``Progress`` events."""

    def __init__(self, console: Any, total: int, quiet: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=quiet,
        )
        self.task = self.bar.add_task("training the original setup", total=total)

    def __enter__(self) -> Any:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, event: Any) -> None:
        from gradmedic.autorepair.result import describe

        if event.index == 0:
            text = "training the original setup" if event.done is None else "searching"
            self.bar.update(self.task, description=text)
            return
        if event.done is None:
            self.bar.update(self.task, description=f"#{event.index}: {describe(event.remedies)}")
        else:
            self.bar.update(self.task, completed=event.spent)
