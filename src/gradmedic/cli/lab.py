"""``gradmedic lab``: run the lab's experiments and write the HTML report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradmedic.cli.errors import user_errors

if TYPE_CHECKING:
    from gradmedic.lab.base import Experiment, Result

_VERDICT_STYLE = {
    "holds": "green",
    "holds partly": "yellow",
    "does not hold": "red",
    "inconclusive": "blue",
    "experiment failed": "bold magenta",
}


def lab(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Experiments to run (default: all).", show_default=False),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the experiments and exit.")] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Small sizes: the whole lab in about a minute.")
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Report folder.")] = Path("gradmedic-report"),
    mnist: Annotated[
        Path | None,
        typer.Option(
            "--mnist", help="Folder with the MNIST IDX files (default: scikit-learn digits)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of every experiment.")] = 0,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Experiments run at once, one process each (default: one per core, at most 4).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Reproduce every claim of the source material and write an HTML report.

    Exit status: 0 when every experiment ran (whatever its verdict), 1 when an
    experiment failed, 2 for a usage error (an unknown experiment, a missing
    MNIST folder, an --out folder that cannot be written).
    """
    from gradmedic.lab import data, runner
    from gradmedic.lab.base import LabConfig, Verdict
    from gradmedic.report.lab_page import previous_seconds, write_report

    console = Console()
    with user_errors():
        chosen = runner.select(names)
        if list_:
            _print_list(console, chosen)
            return
        if mnist is not None:
            data.mnist(mnist)  # fail now, not in the middle of the run
        check_writable(out)  # and not after it
        config = LabConfig(quick=quick, seed=seed, mnist_dir=None if mnist is None else str(mnist))
        n_jobs = runner.default_jobs() if jobs is None else jobs
        parallel = n_jobs > 1 and len(chosen) > 1
        columns = (
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        )
        # No refresh thread while worker processes fork: the display updates as results come.
        with Progress(
            *columns, console=console, transient=True, auto_refresh=not parallel
        ) as progress:
            first = f"running {len(chosen)}, {n_jobs} at a time" if parallel else "starting"
            task = progress.add_task(first, total=len(chosen))

            def started(exp: Experiment) -> None:
                if not parallel:
                    progress.update(task, description=f"running [bold]{exp.name}[/]")

            def done(result: Result) -> None:
                v = result.verdict.value
                style = _VERDICT_STYLE.get(v, "")
                progress.console.print(
                    f"  {result.name:<28} [{style}]{v}[/] ({result.seconds:.1f} s)", highlight=False
                )
                progress.advance(task)
                progress.refresh()

            start = time.perf_counter()
            results = runner.run(
                names,
                config,
                jobs=n_jobs,
                durations=previous_seconds(out, config),  # longest first, as last time
                on_start=started,
                on_done=done,
            )
        index = write_report(results, out, config=config)
        wall = time.perf_counter() - start
    _print_summary(console, results, wall, n_jobs if parallel else 1)
    console.print(
        f"report: [bold]{index}[/]  (numbers: {index.parent / 'results.json'})", highlight=False
    )
    if any(r.verdict is Verdict.ERROR for r in results):
        raise typer.Exit(code=1)


def check_writable(folder: Path) -> None:
    """Raise GradmedicError unless a report can be written into ``folder``.

    Creates the folder (and its parents) if needed, writes and deletes a probe
    file, then removes the folders it created, so a refused or failed run
    leaves nothing behind.
    """
    import os

    from gradmedic.errors import GradmedicError

    created: list[Path] = []
    parent = folder
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".gradmedic-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.strerror and exc.filename and Path(exc.filename) != folder:
            reason += f": {exc.filename}"
        raise GradmedicError(
            f"--out {folder} cannot be written ({reason}): pass a folder you can write to"
        ) from None
    finally:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                continue


def _print_list(console: Console, experiments: list[Experiment]) -> None:
    table = Table(title="gradmedic lab experiments")
    table.add_column("name")
    table.add_column("claims")
    table.add_column("title")
    for exp in experiments:
        table.add_row(exp.name, ", ".join(exp.claims), exp.title)
    console.print(table)


def _print_summary(console: Console, results: list[Result], wall: float, jobs: int) -> None:
    table = Table(title="gradmedic lab")
    table.add_column("experiment")
    table.add_column("claims")
    table.add_column("verdict")
    table.add_column("seconds", justify="right")
    for r in results:
        style = _VERDICT_STYLE.get(r.verdict.value, "")
        per = r.per_claim if len(r.claims) > 1 else {}
        verdict = f"[{style}]{r.verdict.value}[/]" + "".join(
            f"\n  {c}: {v.value}" for c, v in per.items()
        )
        table.add_row(r.name, ", ".join(r.claims), verdict, f"{r.seconds:.1f}")
    console.print(table)
    total = sum(r.seconds for r in results)
    from gradmedic.report.lab_page import verdict_counts

    tally = ", ".join(f"{n} {v}" for v, n in verdict_counts(results))
    console.print(
        f"{len(results)} experiments: {tally}; {wall:.1f} s with the report "
        f"({total:.1f} s in experiments, {jobs} at a time)",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add ``lab`` to the gradmedic CLI."""
    app.command("lab")(lab)
