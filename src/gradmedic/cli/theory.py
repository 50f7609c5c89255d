"""``gradmedic theory``: what mean-field theory predicts for a deep fully connected stack."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer

from gradmedic.cli.errors import user_errors

#: The deepest stack ``--depth`` accepts (the ratio is computed layer by layer: ~0.1 ms each).
MAX_DEPTH = 100_000


def _validate(
    sigma_w: float,
    sigma_b: float,
    depth: int,
    q0: float,
    slope: float | None,
    alpha: float | None,
) -> None:
    """Refuse parameters the theory does not cover, before any computation."""
    if not math.isfinite(sigma_w) or sigma_w <= 0:
        raise ValueError(
            f"--sigma-w: sigma_w must be a finite number > 0 (Var(W) = sigma_w^2 / fan_in; "
            f"0 is all-zero weights), got {sigma_w:g}"
        )
    if not math.isfinite(sigma_b) or sigma_b < 0:
        raise ValueError(
            f"--sigma-b: sigma_b must be a finite number >= 0 (a standard deviation), "
            f"got {sigma_b:g}"
        )
    if depth < 1:
        raise ValueError(f"--depth: depth must be an integer >= 1, got {depth}")
    if depth > MAX_DEPTH:
        raise ValueError(
            f"--depth: depth must be at most {MAX_DEPTH:,} (deeper stacks follow from xi_grad "
            f"and the gain per layer), got {depth:,}"
        )
    if not math.isfinite(q0) or q0 <= 0:
        raise ValueError(f"--q0: q0 must be a finite number > 0 (a variance), got {q0:g}")
    if slope is not None and not math.isfinite(slope):
        raise ValueError(f"--slope: the leaky_relu slope must be a finite number, got {slope:g}")
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"--alpha: the elu alpha must be a finite number > 0, got {alpha:g}")


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.6g}"


def theory(
    activation: Annotated[
        str,
        typer.Option(
            "--activation",
            "-a",
            help="linear, relu, leaky_relu, elu, tanh, sigmoid, softplus, gelu or silu.",
        ),
    ] = "tanh",
    sigma_w: Annotated[
        float, typer.Option("--sigma-w", help="Weight scale (> 0): Var(W) = sigma_w^2 / fan_in.")
    ] = 1.0,
    sigma_b: Annotated[float, typer.Option("--sigma-b", help="Bias standard deviation.")] = 0.0,
    depth: Annotated[int, typer.Option("--depth", help="Number of layers (1 to 100000).")] = 50,
    q0: Annotated[
        float, typer.Option("--q0", help="Input variance (start of the variance map).")
    ] = 1.0,
    slope: Annotated[
        float | None, typer.Option("--slope", help="Negative slope of leaky_relu.")
    ] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Alpha of elu (> 0).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Mean-field prediction: q*, chi, per-layer gradient gain, depth scales, verdict.

    Exit status: 0, or 2 for parameters the theory does not cover.
    """
    from gradmedic.theory import get_activation, summarize

    with user_errors():
        _validate(sigma_w, sigma_b, depth, q0, slope, alpha)
        params: dict[str, Any] = {}
        if slope is not None:
            params["slope"] = slope
        if alpha is not None:
            params["alpha"] = alpha
        act = get_activation(activation, **params)
        summary = summarize(act, sigma_w, sigma_b, depth=depth, q0=q0)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"mean-field theory: {summary.activation}, {depth} layers")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    rows = [
        ("sigma_w / sigma_b", f"{summary.sigma_w:g} / {summary.sigma_b:g}", "weight / bias scale"),
        (
            "q*",
            _fmt(summary.q_star),
            f"fixed point of the variance map ({summary.fixed_point_kind})",
        ),
        ("chi", _fmt(summary.chi), "sigma_w^2 E[phi'(h)^2] at q*"),
        ("gain per layer", _fmt(summary.gain), "sqrt(chi): gradient norm factor per layer"),
        ("xi_grad", _fmt(summary.scales.xi_grad), "1/|log chi|: layers per factor e in |grad|^2"),
        ("xi_q", _fmt(summary.scales.xi_q), "layers for q to reach q*"),
        ("xi_c", _fmt(summary.scales.xi_c), "layers for input correlations to settle"),
        (
            "input/output ratio",
            _fmt(summary.ratio),
            f"||dL/dh_1|| / ||dL/dh_{depth + 1}||, from q0",
        ),
    ]
    for name, value, meaning in rows:
        table.add_row(name, value, escape(meaning))
    console = Console()
    console.print(table)
    console.print(f"verdict: {escape(summary.verdict)}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``theory`` command to ``app``."""
    app.command("theory")(theory)
