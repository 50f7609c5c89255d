"""A record as a few named scalar series, for dashboards (TensorBoard, Lightning, HF logs).

Tags are ``gradmedic/<statistic>/<layer>``. By default only a summary, so a
dashboard is not flooded: the global gradient norm (``grad_norm/global``), the
input-side and output-side layers' gradient norms and deltas, the total gain
``||dL/d output|| of the input-side layer / that of the output-side layer``
(``total_gain/input_over_output``; gradient norms when no delta was recorded;
< 1 the gradient shrinks towards the input, > 1 it grows), the largest update
ratio and the loss. ``per_layer=True`` adds every layer's gradient norm, delta
and update ratio.

Example:
    >>> row = {"step": 3, "global_grad_norm": 2.0, "grad_norm": {"0": 1e-4, "2": 1.0}}
    >>> scalars(row, ["0", "2"])["gradmedic/total_gain/input_over_output"]
    0.0001
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.findings import Diagnosis

PREFIX = "gradmedic"
PER_LAYER = ("grad_norm", "delta_norm", "update_ratio")


def scalars(
    row: Mapping[str, Any], layers: Sequence[str], *, per_layer: bool = False
) -> dict[str, float]:
    """The series of one record: ``{tag: value}`` (finite numbers only)."""
    out: dict[str, float] = {}
    _put(out, "grad_norm/global", row.get("global_grad_norm"))
    for key in ("grad_norm", "delta_norm"):
        values = row.get(key)
        if isinstance(values, Mapping) and layers:
            for name in dict.fromkeys((layers[0], layers[-1])):
                _put(out, f"{key}/{name}", values.get(name))
    source = row.get("delta_norm") or row.get("grad_norm")
    if isinstance(source, Mapping) and len(layers) > 1:
        first: Any = source.get(layers[0])
        last: Any = source.get(layers[-1])
        if _finite(first) and _finite(last) and last > 0:
            _put(out, "total_gain/input_over_output", first / last)
    ratios = row.get("update_ratio")
    if isinstance(ratios, Mapping):
        finite = [v for v in ratios.values() if _finite(v)]
        if finite:
            _put(out, "update_ratio/max", max(finite))
    _put(out, "loss/model", row.get("loss"))
    if per_layer:
        for key in PER_LAYER:
            values = row.get(key)
            if isinstance(values, Mapping):
                for name, v in values.items():
                    _put(out, f"{key}/{name}", v)
    return out


class OpenedFindings:
    """Which problems opened since the last look: ``new(diagnosis)`` returns their tags.

    A problem's series ``gradmedic/finding/<problem>`` is 1 from the look that
    first saw it (logged once, at its onset step).
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def new(self, diagnosis: Diagnosis) -> list[tuple[str, int | None, str]]:
        """``(tag, onset step, one-line summary)`` of each problem not seen before."""
        from gradmedic.report.summary import finding_line

        out = []
        for f in diagnosis.findings:
            if f.problem.value in self.seen:
                continue
            self.seen.add(f.problem.value)
            onset = f.episode.onset if f.episode is not None else f.step
            out.append((f"{PREFIX}/finding/{f.problem.value}", onset, finding_line(f)))
        return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _put(out: dict[str, float], tag: str, value: Any) -> None:
    if _finite(value):
        out[f"{PREFIX}/{tag}"] = float(value)
