"""``gradmedic remedies``: the registered remedy kinds, as the repair search applies them."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gradmedic.remedies.registry import kinds


def remedies(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every remedy kind: its name, the snippet section of its line, its group."""
    ordered = sorted(kinds(), key=lambda k: (k.stage, k.name))
    rows = [
        {
            "name": k.name,
            "names": k.pattern or k.name,
            "where": k.where,
            "stage": k.stage,
            "group": k.group,
            "needs": [t.__name__ for t in k.needs],
            "summary": k.summary,
        }
        for k in ordered
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("remedy", "applies to", "group", "what it does")
    for k in ordered:
        needs = f" (needs {', '.join(t.__name__ for t in k.needs)})" if k.needs else ""
        table.add_row(k.name, k.where, k.group, k.summary + needs)
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add the ``remedies`` command to ``app``."""
    app.command("remedies")(remedies)
