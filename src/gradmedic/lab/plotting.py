"""Shared figure helpers: one style for every lab figure, SVG output.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot),
so nothing depends on a GUI backend or global figure state.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
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
    """Title, axis labels and (when there are labelled lines) a legend below the axes.

    The legend sits outside the data area, so it never hides a curve.
    """
    with _style():
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if legend and ax.get_legend_handles_labels()[0]:
            outside_legend(ax)


def outside_legend(ax: Any, **kwargs: Any) -> None:
    """A legend under the axes (below the x label), in up to 3 columns.

    Axes drawn with :func:`band` get the band's meaning as the legend title.
    """
    handles, labels = ax.get_legend_handles_labels()
    ncol = min(len(labels), 3)
    title = getattr(ax, "gradmedic_note", None)
    with _style():
        ax.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=max(ncol, 1),
            title=title,
            title_fontsize=7,
            **kwargs,
        )


def mark_diverged(ax: Any, x: float, y: float, *, color: Any, text: str = "diverged") -> None:
    """A cross at the last finite point of a run that diverged, labelled ``text``."""
    with _style():
        ax.plot([x], [y], marker="X", markersize=8, color=color, linestyle="none")
        ax.annotate(
            text,
            (x, y),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=7,
            color=color,
        )


def clamp(
    ax: Any,
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    lo: float,
    hi: float,
    *,
    color: Any = "black",
) -> np.ndarray:
    """``y`` with values outside ``[lo, hi]`` (and infinities) drawn as arrows at the edge.

    The axis limits are set to ``[lo, hi]`` (with a little room), so an
    off-scale value no longer sets the scale; each one is marked by a triangle
    at the top or bottom edge. NaN stays out.

    Returns:
        The in-range values (NaN where off-scale), to plot as usual.
    """
    import numpy as np

    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    high = ys > hi
    low = ys < lo
    pad = 0.04 * (hi - lo)
    with _style():
        if high.any():
            ax.plot(xs[high], np.full(high.sum(), hi + pad / 2), "^", color=color, markersize=5,
                    linestyle="none", clip_on=False)  # fmt: skip
        if low.any():
            ax.plot(xs[low], np.full(low.sum(), lo - pad / 2), "v", color=color, markersize=5,
                    linestyle="none", clip_on=False)  # fmt: skip
        ax.set_ylim(lo - pad, hi + pad)
    inside = ys.copy()
    inside[high | low] = np.nan
    return inside


def empty_panels(fig: Any) -> list[str]:
    """Titles (or indices) of the visible axes of ``fig`` that draw no data."""
    out = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison:
            continue
        drawn = [
            a for a in (*ax.lines, *ax.collections, *ax.patches, *ax.images) if a.get_visible()
        ]
        if not drawn:
            out.append(ax.get_title() or f"panel {i + 1}")
    return out


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


class Svg(str):
    """A figure already rendered to SVG text (by a worker process of the lab's runner)."""


def render(fig: Any) -> Svg:
    """:func:`to_svg` of ``fig`` as :class:`Svg`; an :class:`Svg` comes back as it is."""
    return fig if isinstance(fig, Svg) else Svg(to_svg(fig))


def _style() -> Any:
    import matplotlib

    return matplotlib.rc_context(STYLE)


def band(
    ax: Any,
    x: Sequence[float] | np.ndarray,
    runs: Sequence[Sequence[float]],
    *,
    label: str,
    color: Any,
    log: bool = False,
) -> None:
    """The mean of several seeds' curves as a line, their min..max as a shaded band.

    The legend (:func:`label`) says so in its title. Curves of different lengths (a run
    that stopped early) are cut to the shortest.
    """
    import numpy as np

    n = min(len(r) for r in runs)
    ys = np.asarray([list(r)[:n] for r in runs], dtype=float)
    xs = np.asarray(x, dtype=float)[:n]
    with _style():
        ax.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=color, alpha=0.2,
                        linewidth=0)  # fmt: skip
        ax.plot(xs, np.nanmean(ys, axis=0), MEASURED, color=color, label=label)
    ax.gradmedic_note = f"lines: mean of {len(runs)} seeds; bands: min..max"
    if log:
        ax.set_yscale("log")


def grouped_bars(
    ax: Any,
    categories: Sequence[str],
    groups: dict[str, Sequence[Sequence[float]]],
    *,
    log: bool = False,
) -> None:
    """Bars per category (e.g. per layer), one bar per group: mean over seeds, whiskers min..max.

    Args:
        categories: The x labels (discrete: layers, settings).
        groups: ``{label: [values per category, one list per seed]}``.
        log: Log-scaled y axis.
    """
    import numpy as np

    width = 0.8 / max(len(groups), 1)
    pos = np.arange(len(categories), dtype=float)
    with _style():
        for k, (name, per_seed) in enumerate(groups.items()):
            ys = np.asarray(per_seed, dtype=float)  # (seeds, categories)
            mean = np.nanmean(ys, axis=0)
            err = np.vstack([mean - np.nanmin(ys, axis=0), np.nanmax(ys, axis=0) - mean])
            ax.bar(pos + (k - (len(groups) - 1) / 2) * width, mean, width, yerr=err,
                   capsize=2, color=f"C{k}", label=name, error_kw={"linewidth": 0.8})  # fmt: skip
        ax.set_xticks(pos, list(categories))
        n_seeds = max(len(v) for v in groups.values()) if groups else 0
        if n_seeds > 1:
            ax.gradmedic_note = f"bars: mean of {n_seeds} seeds; whiskers: min..max"
        if log:
            ax.set_yscale("log")


def runs_on_scale(
    ax: Any,
    runs: dict[str, Sequence[float]],
    *,
    diverged: dict[str, bool] | None = None,
    x0: int = 1,
    log: bool = True,
) -> None:
    """Training curves where a diverged run cannot hide the others.

    The y range is set by the runs that did not diverge (all runs when every
    one did); values beyond it are drawn as triangles at the edge, and a run
    that diverged (non-finite values, or ``diverged[label]``) ends in a cross
    labelled "diverged", with the step in its legend entry.

    Args:
        ax: The axes.
        runs: ``{label: one value per step}`` (non-finite once diverged).
        diverged: Runs known to have diverged (training stopped early).
        x0: The x of the first value.
        log: Log-scaled y axis.
    """
    import numpy as np

    diverged = dict(diverged or {})
    arrays = {k: np.asarray(v, dtype=float) for k, v in runs.items()}
    for name, ys in arrays.items():
        diverged[name] = bool(diverged.get(name)) or bool((~np.isfinite(ys)).any())

    def usable(ys: np.ndarray) -> np.ndarray:
        ok = np.isfinite(ys) & ((ys > 0) if log else True)
        return ys[ok]

    scale = [usable(ys) for name, ys in arrays.items() if not diverged[name]]
    scale = [v for v in scale if v.size] or [usable(ys) for ys in arrays.values()]
    finite = np.concatenate(scale) if scale else np.array([1.0])
    lo, hi = float(finite.min()), float(finite.max())
    if log:
        lo, hi = lo / 2, hi * 2
    else:
        pad = 0.05 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad
    with _style():
        for k, (name, ys) in enumerate(arrays.items()):
            color = f"C{k}"
            xs = np.arange(x0, x0 + len(ys), dtype=float)
            shown = ys.copy()
            off = np.isfinite(ys) & (ys > hi)
            shown[off | ~np.isfinite(ys)] = np.nan
            if log:
                shown[shown <= 0] = np.nan
            text = name
            bad = np.flatnonzero(~np.isfinite(ys))
            if diverged[name]:
                step = int(xs[bad[0]]) if bad.size else int(xs[-1]) if len(xs) else x0
                text = f"{name} (diverged at step {step})"
            ax.plot(xs, shown, MEASURED, color=color, label=text)
            if off.any():
                ax.plot(xs[off], np.full(off.sum(), hi), "^", color=color, markersize=4,
                        linestyle="none", clip_on=False)  # fmt: skip
            if diverged[name]:
                inside = np.flatnonzero(np.isfinite(shown))
                last = inside[-1] if inside.size else None
                if last is not None and not off.any():
                    mark_diverged(ax, float(xs[last]), float(shown[last]), color=color)
                else:
                    where = float(xs[bad[0]] if bad.size else xs[-1]) if len(xs) else x0
                    mark_diverged(ax, where, hi, color=color)
        if log:
            ax.set_yscale("log")
        ax.set_ylim(lo, hi * (1.5 if log else 1.0))


def seed_runs_on_scale(
    ax: Any,
    runs: dict[str, Sequence[Sequence[float]]],
    *,
    diverged: dict[str, Sequence[bool]] | None = None,
    log: bool = True,
) -> None:
    """:func:`runs_on_scale` of the mean over seeds, with the seeds' min..max shaded.

    A setting whose run diverged in any seed is drawn as diverged (its mean stops
    where the first seed stopped); the band is drawn for the steps every seed ran.

    Args:
        ax: The axes.
        runs: ``{label: [one curve per seed]}``.
        diverged: ``{label: [diverged, per seed]}``.
        log: Log-scaled y axis.
    """
    import numpy as np

    diverged = diverged or {}
    means, bands, stopped = {}, {}, {}
    for name, curves in runs.items():
        n = min(len(c) for c in curves)
        ys = np.asarray([list(c)[:n] for c in curves], dtype=float)
        means[name] = ys.mean(axis=0)
        bands[name] = ys
        stopped[name] = any(diverged.get(name, ())) or bool((~np.isfinite(ys)).any())
    runs_on_scale(ax, means, diverged=stopped, log=log)
    lo, hi = ax.get_ylim()
    with _style():
        for k, ys in enumerate(bands.values()):
            ok = np.isfinite(ys).all(axis=0)
            low = np.clip(ys.min(axis=0), lo, hi)
            high = np.clip(ys.max(axis=0), lo, hi)
            xs = np.arange(1, ys.shape[1] + 1, dtype=float)
            ax.fill_between(xs, low, high, where=ok, color=f"C{k}", alpha=0.2, linewidth=0)
    ax.set_ylim(lo, hi)
    n_seeds = max(len(c) for c in runs.values())
    ax.gradmedic_note = f"lines: mean of {n_seeds} seeds; bands: min..max"


def seed_bands(
    ax: Any, runs: Mapping[str, Sequence[Sequence[float]]], *, log: bool = False
) -> None:
    """:func:`band` for each setting of ``{label: [one curve per seed]}``, x from 1, colors C0..."""
    for k, (name, curves) in enumerate(runs.items()):
        band(ax, range(1, len(curves[0]) + 1), curves, label=name, color=f"C{k}", log=log)


def profile_and_loss(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    profile_title: str,
    loss_title: str = "training loss",
    loss_log: bool = True,
) -> tuple[Any, Any, Any]:
    """Two panels over seeds: the step-0 gradient profile per layer, and the training loss.

    Args:
        runs: ``{setting: [one run per seed]}``, each run with ``"grad_profile"`` (one
            norm per Linear layer) and ``"loss"`` (one value per SGD step).
        profile_title: Title of the profile panel.
        loss_title: Title of the loss panel.
        loss_log: Log-scaled loss axis.

    Returns:
        ``(figure, profile axes, loss axes)``.
    """
    fig, (ax_g, ax_l) = figure(2, width=4.2)
    for ax, key, log in ((ax_g, "grad_profile", True), (ax_l, "loss", loss_log)):
        seed_bands(ax, {k: [r[key] for r in rs] for k, rs in runs.items()}, log=log)
    label(ax_g, profile_title, "Linear layer (input side = 1)", "||dL/dW_l||")
    label(ax_l, loss_title, "SGD step", "cross-entropy")
    return fig, ax_g, ax_l
