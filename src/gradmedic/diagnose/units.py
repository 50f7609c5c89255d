"""Shared helper of the unit-level detectors: activation statistics over recent records."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradmedic.diagnose.episodes import Episode, Point, episode, larger, row_step
from gradmedic.diagnose.profile import recent
from gradmedic.probes.activations import SATURATING, SATURATION_SLOPE, SLOPE_GRID


def unit_stats(rows: Sequence[Mapping[str, Any]], window: int) -> dict[str, dict[str, Any]]:
    """Per activation module: its latest entry with each fraction replaced by its median.

    The median over the last ``window`` records keeps a unit that was silent
    for one batch only from being called dead.
    """
    return _median_stats(recent(rows, "activations", window))


def unit_series(
    rows: Sequence[Mapping[str, Any]], window: int
) -> list[tuple[int, dict[str, dict[str, Any]]]]:
    """``(row index, unit_stats)`` at every record with activation statistics.

    Each uses the median over the (up to) ``window`` such records ending there.
    The first records are judged on the fewer records there are: the probe is
    sampled (one step in 20 by default), so waiting for a full window would date
    a problem present from the first step ``window`` samples late, and the
    preflight ``check()`` judges one batch just the same.
    """
    indexed = [(i, r) for i, r in enumerate(rows) if r.get("activations")]
    out: list[tuple[int, dict[str, dict[str, Any]]]] = []
    for k in range(len(indexed)):
        chosen = [r for _, r in indexed[max(0, k - window + 1) : k + 1]]
        out.append((indexed[k][0], _median_stats(chosen)))
    return out


def why_unchecked(what: str) -> str:
    """Why ``what`` (dead units, saturated units) was not checked: no activation statistics."""
    return (
        f"no `activations` key: {what} not checked (no activation module such as nn.ReLU ran "
        "with gradients, e.g. functional torch.relu only or inside a torch.compile graph, or "
        "watch(..., activations=False))"
    )


Judged = list[tuple[int, dict[str, dict[str, Any]]]]


def unit_episode(
    rows: Sequence[Mapping[str, Any]],
    window: int,
    judge: Callable[[Mapping[str, dict[str, Any]]], dict[str, dict[str, Any]]],
    value: Callable[[dict[str, dict[str, Any]]], float],
    measure: str,
) -> tuple[Judged, Episode | None]:
    """Each record's modules that ``judge`` picks (on its window), and their episode.

    ``value`` of the picked modules (never empty) is the episode's measure ``measure``.
    """
    judged = [(i, judge(stats)) for i, stats in unit_series(rows, window)]
    points = [Point(i, row_step(rows[i], i), bool(h), value(h) if h else 0.0) for i, h in judged]
    return judged, episode(points, larger, measure)


def _median_stats(chosen: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    if not chosen:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, latest in chosen[-1]["activations"].items():
        entry = dict(latest)
        for key in ("dead_fraction", "saturated_fraction", "mean_slope"):
            vals = [
                r["activations"][name][key]
                for r in chosen
                if isinstance(r["activations"].get(name, {}).get(key), int | float)
            ]
            if vals:
                entry[key] = statistics.median(vals)
        entry["step"] = chosen[-1].get("step")
        out[name] = entry
    return out


def pct(x: float) -> str:
    """A fraction as a percentage for explanations."""
    return f"{100 * x:.0f}%"


def vanished_input(entry: Mapping[str, Any]) -> bool:
    """Whether a module's input was identically 0 (the forward signal vanished before it).

    Its units have zero slope, but no bias or weight of theirs is at fault: the
    signal underflowed upstream (e.g. tiny weights over many layers).
    """
    return entry.get("input_mean") == 0.0 and entry.get("input_std") == 0.0


def dead_modules(
    rows: Sequence[Mapping[str, Any]], window: int, threshold: float
) -> dict[str, dict[str, Any]]:
    """Activation modules (not bounded kinds) with at least ``threshold`` dead units."""
    return dead_in(unit_stats(rows, window), threshold)


def dead_in(stats: Mapping[str, dict[str, Any]], threshold: float) -> dict[str, dict[str, Any]]:
    """The modules of ``stats`` (see :func:`unit_stats`) with at least ``threshold`` dead units."""
    return {
        name: s
        for name, s in stats.items()
        if s.get("kind") not in SATURATING
        and not vanished_input(s)
        and s.get("dead_fraction", 0.0) >= threshold
    }


def fraction_at(entry: Mapping[str, Any], slope: float) -> float | None:
    """The saturated fraction of a recorded activation entry under the rule ``|phi'| < slope``.

    Read off ``saturated_by_slope`` (linear in log slope between the grid's rules, the
    nearest end outside it); None when the entry has no grid (an older record).
    """
    grid = entry.get("saturated_by_slope")
    if not isinstance(grid, Sequence) or len(grid) != len(SLOPE_GRID):
        return None
    logs = [math.log(g) for g in SLOPE_GRID]
    x = min(max(math.log(slope), logs[0]), logs[-1])
    for j in range(len(logs) - 1):
        if x <= logs[j + 1]:
            t = (x - logs[j]) / (logs[j + 1] - logs[j])
            return float(grid[j]) + t * (float(grid[j + 1]) - float(grid[j]))
    return float(grid[-1])


def with_slope_rule(rows: Sequence[Mapping[str, Any]], slope: float) -> list[Mapping[str, Any]]:
    """``rows`` with each ``saturated_fraction`` re-read under the rule ``slope``."""
    if slope == SATURATION_SLOPE:
        return list(rows)
    out: list[Mapping[str, Any]] = []
    for row in rows:
        acts = row.get("activations")
        if not isinstance(acts, Mapping):
            out.append(row)
            continue
        new = {}
        for name, entry in acts.items():
            value = fraction_at(entry, slope) if isinstance(entry, Mapping) else None
            new[name] = entry if value is None else {**entry, "saturated_fraction": value}
        out.append({**row, "activations": new})
    return out


def saturated_in(
    stats: Mapping[str, dict[str, Any]], threshold: float
) -> dict[str, dict[str, Any]]:
    """The bounded-activation modules of ``stats`` with at least ``threshold`` saturated."""
    return {
        name: s
        for name, s in stats.items()
        if s.get("kind") in SATURATING and s.get("saturated_fraction", 0.0) >= threshold
    }
