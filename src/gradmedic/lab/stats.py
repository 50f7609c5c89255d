"""Comparisons over several seeds: a difference counts only when it exceeds its own spread.

A comparison's rule is fixed before the run: ``a`` beats ``b`` when the mean
difference is larger than ``margin`` *and* larger than twice its standard error
(about a 95% interval for the difference of two means). Otherwise the two are a
tie at this number of seeds, and the verdict says so instead of reading noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.lab.base import LabConfig

Z = 2.0  # half-width of the interval in standard errors


def seeds(config: LabConfig, n: int = 3) -> list[int]:
    """``n`` random seeds derived from ``config.seed`` (the same in quick and full runs)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [config.seed + 1000 * k for k in range(n)]


def comparison_seeds(config: LabConfig, full: int = 3, quick: int = 2) -> list[int]:
    """The seeds of a comparison: ``full`` in the full run, ``quick`` (fewer) in quick mode."""
    return seeds(config, config.pick(quick, full))


def seed_note(config: LabConfig, used: Sequence[int], full: int = 3) -> str:
    """A sentence for the explanation when quick mode runs fewer seeds than the full run.

    Empty in the full run. With two seeds the standard error has one degree of freedom,
    so a difference must be large to count and a check "in every seed" sees less of the
    spread: quick verdicts are less certain than the full run's.
    """
    if not config.quick or len(used) >= full:
        return ""
    return (
        f" Quick run: {len(used)} seed{'s' if len(used) != 1 else ''}, not the full run's "
        f"{full}, so the spread over seeds is only roughly known; the full run's verdict is "
        "the firmer one."
    )


def each(runs: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """``[run[key] for run in runs]`` as floats: one value per seed."""
    return [float(r[key]) for r in runs]


def mean_profile(profiles: Sequence[Sequence[float]]) -> list[float]:
    """The element-wise mean of equally long lists (one per seed), e.g. per-layer norms."""
    return [statistics.fmean(v) for v in zip(*profiles, strict=True)]


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the values themselves (non-finite kept out).

    ``n`` counts the finite values; ``n_nonfinite`` the others (a diverged run).
    """
    finite = [float(v) for v in values if math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0 if finite else math.nan
    return {
        "mean": mean,
        "std": std,
        "n": len(finite),
        "n_nonfinite": len(values) - len(finite),
        "values": [float(v) for v in values],
    }


def compare(
    a: Sequence[float], b: Sequence[float], *, margin: float, paired: bool = True
) -> dict[str, Any]:
    """Whether ``a`` is larger than ``b`` beyond noise.

    Args:
        a: One value per seed (e.g. final accuracy of the treated net).
        b: The same for the baseline.
        margin: The smallest mean difference that counts, in the values' unit.
        paired: ``a[i]`` and ``b[i]`` share seed ``i`` (same weights and
            batches); the standard error then comes from the per-seed differences.

    Returns:
        ``{"diff", "se", "half_width", "margin", "outcome"}`` with ``outcome``
        ``"a > b"``, ``"a < b"`` or ``"tie"``.

    Example:
        >>> compare([0.9, 0.91, 0.92], [0.5, 0.52, 0.51], margin=0.01)["outcome"]
        'a > b'
    """
    if len(a) != len(b) and paired:
        raise ValueError(f"paired comparison needs as many a as b values, got {len(a)}, {len(b)}")
    if not a or not b:
        raise ValueError("compare needs at least one value on each side")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not all(math.isfinite(v) for v in (*a, *b)):
        return {"diff": math.nan, "se": math.nan, "half_width": math.nan, "margin": margin,
                "outcome": "tie"}  # fmt: skip
    if paired:
        d = [x - y for x, y in zip(a, b, strict=True)]
        diff = statistics.fmean(d)
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    else:
        diff = statistics.fmean(a) - statistics.fmean(b)
        va = statistics.variance(a) if len(a) > 1 else math.inf
        vb = statistics.variance(b) if len(b) > 1 else math.inf
        se = math.sqrt(va / len(a) + vb / len(b))
    half = Z * se
    bar = max(margin, half)
    outcome = "a > b" if diff > bar else "a < b" if diff < -bar else "tie"
    return {"diff": diff, "se": se, "half_width": half, "margin": margin, "outcome": outcome}


def describe(cmp: dict[str, Any], unit: str = "") -> str:
    """``"+0.031 +- 0.012 (margin 0.01)"`` for a :func:`compare` result."""
    return (
        f"{cmp['diff']:+.3g}{unit} +- {cmp['half_width']:.2g}{unit} "
        f"(margin {cmp['margin']:g}{unit})"
    )
