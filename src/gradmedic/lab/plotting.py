"""Shared figure helpers: one style for every lab figure, SVG output.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot),
so nothing depends on a GUI backend or global figure state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

STYLE: dict[Any, Any] = {  # matplotlib rc keys (typed there as a Literal of all names)
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "lines.linewidth": 1.6,
    "svg.fonttype": "none",  # text stays text: smaller files, selectable labels
    "svg.hashsalt": "gradmedic",  # same figure -> same SVG bytes
}

MEASURED = "-"
PREDICTED = "--"


def figure(
    ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 3.4, sharey: bool = False
) -> tuple[Any, Any]:
    """A new figure with ``nrows x ncols`` axes in the lab style.

    Returns:
        ``(figure, axes)``; ``axes`` is one Axes when there is one, else an array.
    """
    from matplotlib.figure import Figure

    with _style():
        fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=True)
    return fig, axes


def profile(
    ax: Any,
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    label: str | None,
    predicted: bool = False,
    color: Any = None,
    log: bool = True,
) -> None:
    """Draw a measured (solid) or predicted (dashed) profile, on a log y axis by default.

    Non-positive and non-finite values are left out of a log plot instead of
    breaking it.
    """
    import numpy as np

    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    ok = np.isfinite(ys) & ((ys > 0) if log else True)
    with _style():
        ax.plot(
            xs[ok],
            ys[ok],
            PREDICTED if predicted else MEASURED,
            label=label,
            color=color,
            alpha=0.8 if predicted else 1.0,
        )
    if log:
        ax.set_yscale("log")


def label(ax: Any, title: str, xlabel: str, ylabel: str, *, legend: bool = True) -> None:
    """Title, axis labels and (when there are labelled lines) a legend."""
    with _style():
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend()


def layer_colors(n: int) -> list[Any]:
    """``n`` colors from input side (dark) to output side (light), one per layer."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]


def to_svg(fig: Any) -> str:
    """The figure as an SVG document (deterministic: no date, fixed ids)."""
    buf = io.StringIO()
    with _style():
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _style() -> Any:
    import matplotlib

    return matplotlib.rc_context(STYLE)
