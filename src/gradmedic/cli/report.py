"""``gradmedic report``: diagnose a run saved by ``watch(sink=...)``, without the model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gradmedic.cli.errors import user_errors


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to ``app``."""

    @app.command("report")
    def report_command(
        path: Annotated[Path, typer.Argument(help="A JSONL file written by watch(sink=...).")],
        run: Annotated[
            int, typer.Option(help="Which run of the file (0 = first, -1 = last).")
        ] = -1,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the diagnosis as JSON.")
        ] = False,
        html: Annotated[
            Path | None,
            typer.Option("--html", help="Also write an HTML run report (figures) in this folder."),
        ] = None,
    ) -> None:
        """Diagnose a recorded run from its JSONL file (exit 1 on findings)."""
        from gradmedic.diagnose import diagnose_rows
        from gradmedic.history import load_history
        from gradmedic.report.terminal import console

        with user_errors():
            header, rows = load_history(path, run=run)
            if not rows:
                raise ValueError(f"{path} run {run} holds a header but no recorded step yet")
            diagnosis = diagnose_rows(rows, layers=header.get("layers"))
            if html is not None:
                from gradmedic.report.run_report import write_run_report

                index = write_run_report(rows, diagnosis, html, title=f"gradmedic: {path.name}",
                                         layers=header.get("layers"))  # fmt: skip
        if as_json:
            typer.echo(diagnosis.to_json())
        else:
            out = console()
            out.print(f"[bold]{path}[/]: {len(rows)} recorded steps")
            out.print(diagnosis)
            if html is not None:
                out.print(f"report: {index}")
        raise typer.Exit(code=0 if diagnosis.healthy else 1)
