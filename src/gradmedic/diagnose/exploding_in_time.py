"""Exploding in time: ``||dL/dh_t||`` grows going back through the sequence (K5, R7).

Fires when the gradient at the first processed step is more than ``exploding_gain``
(1e3, the threshold of the depth detectors) times the last step's, fitted
(``per_step_gain ** (T-1)``) or measured, or when the profile overflowed to inf.
The weight gradient is a sum over steps, so the far past then dominates it by three
orders of magnitude and a step sized for it throws the weights far off. Critical
beyond ``severe_gain_decades`` (1e6) or on overflow: a million-fold amplification
overflows float16 (max 65504) as soon as the last step's gradient exceeds ~0.07.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradmedic.diagnose.in_time import TimeFit, fit_modules, processing_order
from gradmedic.diagnose.profile import positive, sci
from gradmedic.diagnose.registry import register
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.remedies import catalog


def explodes(fit: TimeFit, limit: float) -> bool:
    """Whether the profile grows beyond ``limit`` within the sequence (or overflowed)."""
    if fit.nonfinite and any(v == math.inf for v in fit.profile):
        return True
    return fit.per_step_gain > 1 and (fit.total_gain > limit or fit.end_ratio > limit)


def amplification(fit: TimeFit) -> float:
    """Mean ``||dL/dh_t||`` over the last step's: how much the growth inflates the sum.

    Without growth every step would contribute about the last step's share.
    """
    back = [v for v in processing_order(fit.profile, fit.stream) if positive(v)]
    if not back:
        return math.inf
    return float(np.mean(back)) / back[0]


def clip_threshold(fit: TimeFit, rows: Sequence[Mapping[str, Any]]) -> tuple[float, str]:
    """A global-norm clipping threshold from the observed norms, and its reason.

    The recorded ``global_grad_norm`` divided by the growth's amplification: the
    norm the gradient would have if every step contributed like the last one.
    """
    norms = [r["global_grad_norm"] for r in rows if positive(r.get("global_grad_norm"))]
    amp = amplification(fit)
    if norms and math.isfinite(amp) and amp > 0:
        total = float(np.median(norms[-5:]))
        return total / max(amp, 1.0), (
            f"the median recorded gradient norm {sci(total)} divided by the growth's "
            f"amplification {sci(amp)} (mean ||dL/dh_t|| over the last step's) (R7)"
        )
    return 1.0, "no gradient norm recorded; 1.0 is the usual starting point (R7)"


def remedies(fit: TimeFit, rows: Sequence[Mapping[str, Any]], limit: float) -> list[Remedy]:
    """Ranked cures: clip first (it works on any model), then remove the cause."""
    threshold, why = clip_threshold(fit, rows)
    out = [catalog.clip_norm(threshold, why)]
    g = fit.per_step_gain
    steps = max(1, int(math.log(limit) / math.log(g))) if g > 1 else fit.seq_len
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
    text += (
        f"||dL/dh_t|| grows by a factor {fit.per_step_gain:.3g} per step going back in time "
        f"(least-squares fit over {fit.seq_len} steps): the first step's gradient is "
        f"{sci(fit.end_ratio)}x the last step's (fitted {sci(fit.total_gain)}x), above "
        f"{sci(limit)}. "
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


@register(Problem.EXPLODING_IN_TIME)
def detect(rows: Sequence[Mapping[str, Any]], config: Any) -> list[Finding]:
    """One finding per recurrent module whose gradient grows back through the sequence."""
    limit = float(getattr(config, "exploding_gain", 1e3))
    severe = 10.0 ** float(getattr(config, "severe_gain_decades", 6.0))
    findings = []
    for module, fits in fit_modules(rows, config).items():
        bad = [f for f in fits if explodes(f, limit)]
        if not bad:
            continue
        worst = max(bad, key=lambda f: (f.nonfinite, f.total_gain))
        critical = worst.nonfinite or max(worst.total_gain, worst.end_ratio) > severe
        findings.append(
            Finding(
                problem=Problem.EXPLODING_IN_TIME,
                severity=Severity.CRITICAL if critical else Severity.WARNING,
                layers=[module],
                evidence=worst.evidence({f.stream: f.per_step_gain for f in fits}),
                explanation=explain(worst, limit),
                remedies=remedies(worst, rows, limit),
                step=worst.step,
            )
        )
    return findings
