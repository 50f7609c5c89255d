"""``gradmedic run SCRIPT.py [ARGS...]``: run an unmodified training script under gradmedic.

Like a profiler: the script runs as ``__main__`` with ``sys.argv = [SCRIPT, *ARGS]``;
every model it trains is watched (:mod:`gradmedic.autoattach`); when it ends,
fails or is interrupted, the diagnosis of each model is printed (stderr) and its
JSONL records, ``diagnosis.json`` and HTML run report are written (a second
model goes in a subfolder named after it). The exit status is the
script's own: ``sys.exit(n)`` gives ``n``, an uncaught exception 1 (its
traceback printed as Python would), Ctrl-C 130.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from gradmedic.cli.errors import user_errors

#: Exit status of a script stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def register(app: typer.Typer) -> None:
    """Add the ``run`` command to ``app``."""

    @app.command(
        "run",
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )
    def run_command(
        script: Annotated[Path, typer.Argument(help="The training script to run.")],
        args: Annotated[
            list[str] | None, typer.Argument(help="Arguments passed to the script.")
        ] = None,
        out: Annotated[
            Path, typer.Option("--out", help="Folder of the JSONL records and HTML report(s).")
        ] = Path("gradmedic-run"),
        sink: Annotated[
            Path | None,
            typer.Option(help="JSONL file of the records, replaced (default OUT/run.jsonl)."),
        ] = None,
        html: Annotated[
            bool, typer.Option("--html/--no-html", help="Write the HTML report.")
        ] = True,
        every: Annotated[int, typer.Option(min=1, help="Record one step in this many.")] = 1,
        update_every: Annotated[
            int,
            typer.Option(min=1, help="Measure update ratios on one recorded step in this many."),
        ] = 10,
        activations: Annotated[int, _sampled("Dead/saturated units")] = 20,
        recurrent: Annotated[int, _sampled("Gradient through time")] = 20,
        spectra: Annotated[int, _sampled("Weight spectra")] = 0,
        tensorboard: Annotated[
            Path | None, typer.Option(help="Also log to TensorBoard in this folder.")
        ] = None,
        per_layer: Annotated[
            bool, typer.Option(help="TensorBoard: a series per layer, not only the summary.")
        ] = False,
        fail_on_findings: Annotated[
            bool,
            typer.Option(
                help="Exit 1 when the script succeeded but a diagnosis is not healthy (a "
                "problem found, or nothing the monitor could diagnose), as `gradmedic report`."
            ),
        ] = False,
    ) -> None:
        """Run SCRIPT under gradmedic; print and save the diagnosis when it ends (its exit code)."""
        with user_errors():
            if not script.is_file():
                raise ValueError(f"no script at {script}; give the path of a Python file")
            out.mkdir(parents=True, exist_ok=True)
        sampled = {"activations": activations, "recurrent": recurrent, "spectra": spectra}
        code = run_script(
            script,
            list(args or []),
            out=out,
            sink=sink or out / "run.jsonl",
            html=html,
            tensorboard=tensorboard,
            per_layer=per_layer,
            fail_on_findings=fail_on_findings,
            **_watch_options(every, update_every, sampled),
        )
        raise typer.Exit(code=code)


def _sampled(what: str) -> Any:
    """The option of a probe that samples one step in N (``0``: the probe is off)."""
    return typer.Option(min=0, help=f"{what} on one step in this many (0: off).")


def _watch_options(every: int, update_every: int, sampled: dict[str, int]) -> dict[str, Any]:
    """``watch()`` options from the command line's: a sampling of 0 turns its probe off."""
    return {
        "every": every,
        "update_every": update_every,
        **{k: v or False for k, v in sampled.items()},
    }


def run_script(
    script: Path,
    args: list[str],
    *,
    out: Path,
    sink: Path | None,
    html: bool = True,
    tensorboard: Path | None = None,
    per_layer: bool = False,
    fail_on_findings: bool = False,
    **options: Any,
) -> int:
    """Run ``script`` watched; report each model; return the exit status.

    ``sink`` is replaced if it exists (a fresh run, not appended to the last one).
    """
    from gradmedic.autoattach import AutoAttach

    out.mkdir(parents=True, exist_ok=True)
    if sink is not None:
        sink.parent.mkdir(parents=True, exist_ok=True)
        sink.unlink(missing_ok=True)

    on_record = None
    writer = None
    if tensorboard is not None:
        from gradmedic.integrations.tensorboard import TensorBoardWriter

        writer = TensorBoardWriter(tensorboard, per_layer=per_layer)
        on_record = writer.on_record
    session = AutoAttach(sink=sink, on_record=on_record, **options)
    code = _execute(script, args, session)
    if writer is not None:
        for w in session.watched:
            if w.monitor.history.total:
                writer.findings(w.monitor)
        writer.close()
    found = _report(session, script, out, html)
    if code == 0 and found and fail_on_findings:
        return 1
    return code


def _execute(script: Path, args: list[str], session: Any) -> int:
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        with session:
            runpy.run_path(str(script), run_name="__main__")
        return 0
    except SystemExit as exc:
        return _exit_status(exc.code)
    except KeyboardInterrupt:
        print("gradmedic: interrupted (Ctrl-C); the diagnosis so far follows", file=sys.stderr)
        return INTERRUPTED
    except BaseException as exc:
        _print_traceback(exc, script)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def _exit_status(code: object) -> int:
    """What Python's interpreter does with ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_traceback(exc: BaseException, script: Path) -> None:
    """The script's traceback as Python prints it, without gradmedic's and runpy's frames."""
    tb = exc.__traceback__
    target = os.path.realpath(script)
    while tb is not None and os.path.realpath(tb.tb_frame.f_code.co_filename) != target:
        tb = tb.tb_next
    if tb is None and isinstance(exc, SyntaxError):
        tb = None  # the script never ran: Python shows only the file, the line and the caret
    elif tb is None:
        tb = exc.__traceback__
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def _report(session: Any, script: Path, out: Path, html: bool) -> bool:
    """Print each watched model's diagnosis, write its report; whether any is not healthy."""
    from gradmedic.report.terminal import console

    err = console(stderr=True)
    watched = [w for w in session.watched if w.monitor.history.total]
    if not watched:
        err.print(
            "gradmedic: no training step was seen (no backward pass followed by a "
            "parameter update in any model): nothing to diagnose",
            style="yellow",
        )
        return True  # not healthy: nothing was diagnosed
    found = False
    for k, w in enumerate(watched):
        diagnosis = w.monitor.diagnose()
        found = found or not diagnosis.healthy
        how = "optimizer steps" if w.mode == "optimizer" else "manual updates"
        taken = w.monitor.history.total - w.monitor.skipped
        skipped = f", {w.monitor.skipped} skipped" if w.monitor.skipped else ""
        err.rule(f"gradmedic: {w.name} ({how}, {taken} records{skipped})")
        err.print(diagnosis)
        folder = out if k == 0 else out / w.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "diagnosis.json").write_text(diagnosis.to_json(), encoding="utf-8")
        if w.sink is not None:
            err.print(f"records: {w.sink}")
        if html:
            try:
                index = _write_html(w, diagnosis, folder, f"{script.name}: {w.name}")
                err.print(f"report: {index}")
            except ImportError as exc:
                err.print(f"gradmedic: no HTML report ({exc.name} is missing: "
                          "pip install 'gradmedic[lab]')", style="yellow")  # fmt: skip
    return found


def _write_html(w: Any, diagnosis: Any, folder: Path, title: str) -> Path:
    from gradmedic.history import load_history
    from gradmedic.report.run_report import write_run_report

    rows = load_history(w.sink)[1] if w.sink is not None and w.sink.is_file() else []
    rows = rows or w.monitor.history.rows()
    return write_run_report(rows, diagnosis, folder, title=title, layers=w.monitor.layers)
