"""Exploding in time: ``||dL/dh_t||`` grows going back through the sequence (K5, R7).

Fires when the gradient at the first processed step is more than ``exploding_gain``
(1e3, the threshold of the depth detectors) times the last step's, fitted
(``per_step_gain ** (T-1)``) or measured, when it grows at least
``exploding_step_gain`` (2x) per step back over 4 or more steps (the factor is
``W_hh``'s; a short sequence only hides it), or when the profile overflowed to inf.
The weight gradient is a sum over steps, so the far past then dominates it by three
orders of magnitude and a step sized for it throws the weights far off. Critical
beyond ``severe_gain_decades`` (1e6) or on overflow: a million-fold amplification
overflows float16 (max 65504) as soon as the last step's gradient exceeds ~0.07.

Every record with a recurrent profile is judged on its window (an episode over the
run); the severity comes from the worst record's own growth, never the window's
geometric mean (which turns a 3.5e29x record among four calm ones into ~1e6x). The
clip threshold is the diagnosis' one (:mod:`gradmedic.diagnose.suggest`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.episodes import Point, episode, larger
from gradmedic.diagnose.in_time import NO_RECURRENT, TimeFit, explodes, module_series
from gradmedic.diagnose.profile import sci
from gradmedic.diagnose.registry import register
from gradmedic.diagnose.setup import setup_of, tailored
from gradmedic.diagnose.signals import nonfinite_row
from gradmedic.diagnose.suggest import suggested
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.remedies import catalog


def remedies(
    fit: TimeFit, rows: Sequence[Mapping[str, Any]], limit: float, config: DiagnosisConfig
) -> list[Remedy]:
    """Ranked cures: clip first (it works on any model), then remove the cause."""
    s = suggested(rows, config)
    out = []
    if s.clip_norm is not None:
        out.append(catalog.clip_norm(s.clip_norm, f"{s.clip_why} (R7)"))
    g = fit.per_step_gain
    steps = max(1, int(math.log(limit) / math.log(g))) if g > 1 else fit.seq_len
    if steps < fit.seq_len:  # a window as long as the sequence truncates nothing
        out.append(
            catalog.truncate_bptt(
                steps, f"at {g:.3g}x per step the gradient grows {sci(limit)}x in {steps} steps"
            )
        )
    out.append(
        catalog.init_scheme(
            "orthogonal",
            f"every singular value of W_hh 1 (now sigma_max {fit.sigma_max or math.nan:.2g}): "
            "no direction is amplified",
        )
    )
    if fit.kind == "rnn":
        out.append(
            catalog.gate_recurrent(
                "lstm", "the cell path is scaled by a forget gate <= 1, not by W_hh (R8)"
            )
        )
        out.append(catalog.gate_recurrent("gru", "the state update is a convex mix, bounded (R9)"))
    return out


def explain(fit: TimeFit, limit: float) -> str:
    """The chain-rule reason with the measured numbers."""
    where = f"{fit.module}" + (f" ({fit.stream})" if fit.stream != "l0" else "")
    if any(v == math.inf for v in fit.profile):
        head = f"In {where}, ||dL/dh_t|| overflowed to inf going back in time; "
    else:
        head = ""
    text = head or f"In {where}, "
    g = fit.per_step_gain
    text += (
        f"||dL/dh_t|| grows by a factor {g:.3g} per step going back in time "
        f"(least-squares fit over {fit.seq_len} steps): the first step's gradient is "
        f"{sci(fit.end_ratio)}x the last step's (fitted {sci(fit.total_gain)}x)"
    )
    if max(fit.total_gain, fit.end_ratio) > limit or head:
        text += f", above {sci(limit)}. "
    else:
        reach = math.ceil(math.log(limit) / math.log(g)) + 1
        text += (
            f"; at this rate it passes {sci(limit)} in a sequence of {reach} steps: the "
            "factor belongs to the weights, and this sequence is only short. "
        )
    sigma, rho = fit.sigma_max, fit.spectral_radius
    if sigma is not None and rho is not None:
        gamma = fit.gamma or 1.0
        block = "W_hh" if fit.kind == "rnn" else "the candidate block of W_hh"
        text += (
            f"Each step multiplies the gradient by the step's Jacobian (for an RNN "
            f"diag(phi'(a_t)) W_hh^T); growth needs sigma_max > 1/gamma "
            f"and, for a lasting one, spectral radius > 1 (Pascanu et al. 2013): "
            f"{block} has sigma_max = {sigma:.3g} "
            f"({'>' if sigma > 1 / gamma else '<='} 1/gamma = {1 / gamma:g}) and "
            f"rho = {rho:.3g} ({'>' if rho > 1 else '<='} 1)."
        )
    return text


@register(
    Problem.EXPLODING_IN_TIME,
    needs=("recurrent",),
    why=NO_RECURRENT,
)
def detect(rows: Sequence[Mapping[str, Any]], config: DiagnosisConfig) -> list[Finding]:
    """One finding per recurrent module whose gradient grows back through the sequence."""
    limit, step_gain = config.exploding_gain, config.exploding_step_gain
    severe = 10.0**config.severe_gain_decades
    findings = []
    for module, series, alone in module_series(rows, config):
        last = max(alone) if alone else -1
        if not any(nonfinite_row(r) for r in rows[last + 1 :]):
            last = -1
        points = []
        for p in series:
            bad = any(explodes(f, limit, step_gain) for f in p.fits)
            own = alone.get(p.index, p)
            growth = max(_growth(f) for f in own.fits)
            if not bad and any(explodes(f, limit, step_gain) for f in own.fits):
                # as for depth: one record beyond the severe threshold, or the last one
                # before the run turned non-finite, counts alone
                bad = growth > severe or p.index == last
            points.append(Point(p.index, p.step, bad, growth))
        ep = episode(points, larger, "growth")
        if ep is None:
            continue
        end = max(m.index for m in points if m.bad)
        at = next(p for p in series if p.index == end)
        if not any(explodes(f, limit, step_gain) for f in at.fits):
            at = alone.get(end, at)  # the record that counted alone
        fits = list(at.fits)
        worst = max(
            (f for f in fits if explodes(f, limit, step_gain)),
            key=lambda f: (f.nonfinite, f.total_gain),
        )
        peak = ep.peak_value if ep.peak_value is not None else _growth(worst)
        critical = worst.nonfinite or peak > severe
        evidence = worst.evidence({f.stream: f.per_step_gain for f in fits})
        evidence["peak_growth"] = peak
        findings.append(
            Finding(
                problem=Problem.EXPLODING_IN_TIME,
                severity=Severity.CRITICAL if critical else Severity.WARNING,
                layers=[module],
                evidence=evidence,
                explanation=explain(worst, limit)
                + (
                    f" At its worst (step {ep.peak}) one record grew {sci(peak)}x across the "
                    "sequence."
                    if peak > max(worst.total_gain, worst.end_ratio) * 10
                    else ""
                ),
                remedies=tailored(remedies(worst, rows, limit, config), setup_of(config)),
                step=worst.step,
                episode=ep,
            )
        )
    return findings


def _growth(fit: TimeFit) -> float:
    """A record's growth across the sequence (inf when the profile overflowed).

    The larger of the fitted and the measured ratio of the first step's gradient
    to the last's.
    """
    if any(v == math.inf for v in fit.profile):
        return math.inf
    values = [v for v in (fit.total_gain, fit.end_ratio) if not math.isnan(v)]
    return max(values) if values else math.nan
