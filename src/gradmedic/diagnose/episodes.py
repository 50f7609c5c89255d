"""Episodes: when a problem held over the whole recorded run.

Each detector judges every record on which its evidence was measured (on the
window of records ending there, so that one odd batch neither starts nor ends
a problem) and hands the judgements to :func:`episode`. The finding then says
when the problem started (``onset``), where it was worst (``peak``, from the
record's own value, never diluted by the window) and whether it stopped
(``recovery``, the first measured record after the last bad one). Severity
comes from the peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradmedic.findings import Episode


@dataclass(frozen=True)
class Point:
    """One measured record, as a detector judged it.

    Attributes:
        index: Row index of the record.
        step: Its step.
        bad: Whether the problem held there.
        value: The record's own measure (the peak is the most extreme one).
    """

    index: int
    step: int | None
    bad: bool
    value: float


def larger(a: float, b: float) -> bool:
    """``a`` more extreme than ``b`` for a measure where larger is worse (NaN counts as inf)."""
    return _key(a) > _key(b)


def smaller(a: float, b: float) -> bool:
    """``a`` more extreme than ``b`` for a measure where smaller is worse (NaN counts as -inf)."""
    return _low(a) < _low(b)


def _key(v: float) -> float:
    return math.inf if math.isnan(v) else v


def _low(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def episode(
    points: Sequence[Point], worse: Callable[[float, float], bool], measure: str
) -> Episode | None:
    """The episode of ``points`` (None when no point is bad).

    Separate bad stretches form one episode from the first onset to the last
    bad record; ``recovery`` is the first good point after the last bad one.

    Example:
        >>> pts = [Point(0, 0, False, 1.0), Point(1, 1, True, 5.0), Point(2, 2, True, 9.0),
        ...        Point(3, 3, False, 1.0)]
        >>> e = episode(pts, larger, "x")
        >>> (e.onset, e.peak, e.peak_value, e.last, e.recovery, e.records)
        (1, 2, 9.0, 2, 3, 2)
    """
    bad = [p for p in points if p.bad]
    if not bad:
        return None
    peak = bad[0]
    for p in bad[1:]:
        if worse(p.value, peak.value):
            peak = p
    last = bad[-1]
    recovery = next((p.step for p in points if p.index > last.index and not p.bad), None)
    return Episode(
        onset=bad[0].step,
        peak=peak.step,
        peak_value=peak.value,
        last=last.step,
        recovery=recovery,
        records=len(bad),
        measure=measure,
    )


def describe(ep: Episode, unit: str = "") -> str:
    """The episode in one sentence for an explanation.

    Example:
        >>> text = describe(Episode(onset=3, peak=5, peak_value=2e6, last=9, recovery=10,
        ...                         records=7, measure="total_gain"))
        >>> text.startswith("It held from step 3 to step 9 (7 records), worst at step 5")
        True
    """
    span = (
        f"at step {ep.onset}"
        if ep.onset == ep.last
        else f"from step {ep.onset} to step {ep.last} ({ep.records} records)"
    )
    worst = ""
    if ep.peak is not None and ep.peak_value is not None and ep.onset != ep.last:
        worst = f", worst at step {ep.peak} ({ep.measure} {ep.peak_value:.3g}{unit})"
    end = (
        f", and was gone at step {ep.recovery}."
        if ep.recovery is not None
        else ", and still held at the last measured record."
    )
    return f"It held {span}{worst}{end}"


def row_step(row: Mapping[str, Any], index: int) -> int:
    """A record's step (its index when the record has none)."""
    step = row.get("step")
    return int(step) if isinstance(step, int | float) and not isinstance(step, bool) else index
