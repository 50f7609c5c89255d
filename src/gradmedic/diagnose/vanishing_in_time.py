"""Vanishing in time: ``||dL/dh_t||`` dies out within the sequence (K5, R8, R9).

Fires when the gradient going back from the last processed step falls below
``vanishing_gain`` (1e-3, the threshold of the depth detectors) of its last-step
value within the sequence: measured (the horizon is shorter than the sequence)
or fitted (``per_step_gain ** (T-1) < vanishing_gain``). Inputs further back than
the horizon then move the weights less than a thousandth as much as the last
ones: the network cannot learn dependencies that long. Critical beyond
``severe_gain_decades`` (1e-6): below float32's resolution (1.2e-7) relative to the
recent steps' terms, the far past does not register in the summed weight gradient.

A gated cell (LSTM, GRU) sets its decay with a learnable gate: while the gate is
open at least :data:`GATE_LEARNS` (PyTorch's init leaves it at sigmoid(0) = 0.5) its
bias can still learn a longer memory. Such a cell is not a finding when a loss
at every step feeds every step directly (the whole loss's ``||dL/dh_t||`` does not
fade: a language model), which is how PyTorch's own word-language-model example
trains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.episodes import Point, episode, smaller
from gradmedic.diagnose.in_time import NO_RECURRENT, TimeFit, module_series, vanishes
from gradmedic.diagnose.profile import sci
from gradmedic.diagnose.registry import register
from gradmedic.diagnose.setup import setup_of, tailored
from gradmedic.findings import Finding, Problem, Remedy, Severity
from gradmedic.remedies import catalog

#: A gate mean (LSTM forget gate, GRU update gate) at or above this is in its learnable range.
GATE_LEARNS = 0.25
_GATE = {"lstm": "forget_gate_mean", "gru": "update_gate_mean"}


def gate_learns(fit: TimeFit) -> bool:
    """Whether ``fit`` is a gated cell whose keep-gate is still open enough to learn."""
    key = _GATE.get(fit.kind)
    value = fit.gates.get(key) if key else None
    return value is not None and value >= GATE_LEARNS


def fades(fit: TimeFit, limit: float) -> bool:
    """Whether the gradient dies out within the sequence, and a learnable gate cannot help.

    A gated cell with a learnable gate whose every step gets its own loss
    (``whole_fades`` False) is trained at every step: not a finding.
    """
    return vanishes(fit, limit) and not (gate_learns(fit) and fit.whole_fades is False)


def forget_bias_for(seq_len: int, limit: float) -> float:
    """Forget-gate bias whose gate ``sigmoid(b)`` keeps ``f^(T-1) >= limit``.

    ``f >= limit^(1/(T-1))``, so ``b = logit(f)``, rounded up to a half and at least 1.

    Example:
        >>> forget_bias_for(100, 1e-3)
        3.0
    """
    f = limit ** (1.0 / max(seq_len - 1, 1))
    b = math.log(f / (1.0 - f)) if f < 1 else 1.0
    return max(1.0, math.ceil(b * 2) / 2)


def remedies(fit: TimeFit, limit: float) -> list[Remedy]:
    """Ranked cures for the kind of cell."""
    out: list[Remedy] = []
    reach = fit.horizon if fit.horizon is not None else fit.seq_len
    if fit.kind == "lstm":
        f = fit.gates.get("forget_gate_mean")
        b = forget_bias_for(fit.seq_len, limit)
        out.append(
            catalog.forget_bias(
                b,
                "the cell gradient is multiplied by the forget gate at each step"
                + (f" (measured mean {sci(f)})" if f is not None else "")
                + f"; sigmoid({b:g}) = {1 / (1 + math.exp(-b)):.3f} keeps "
                f"{fit.seq_len - 1} steps above {sci(limit)} (R8)",
            )
        )
        out.append(
            catalog.init_scheme(
                "orthogonal",
                _sigma_note(fit, "then set the forget bias again (init zeroes biases)"),
            )
        )
    elif fit.kind == "gru":
        out.append(catalog.init_scheme("orthogonal", _sigma_note(fit)))
    else:
        out.append(
            catalog.gate_recurrent(
                "lstm", "the cell state's additive path is scaled by a gate, not by W_hh (R8)"
            )
        )
        out.append(
            catalog.gate_recurrent("gru", "the update gate copies the state like a residual (R9)")
        )
        out.append(
            catalog.init_scheme("orthogonal", _sigma_note(fit, "the largest without explosion"))
        )
    out.append(
        catalog.truncate_bptt(
            max(reach, 1),
            f"beyond {reach} steps the gradient is below {sci(limit)} of the last step's "
            "anyway: saves compute (does not lengthen the memory)",
        )
    )
    return out


def _sigma_note(fit: TimeFit, why: str = "") -> str:
    block = "W_hh" if fit.kind == "rnn" else "the candidate block of W_hh"
    now = f"{fit.sigma_max:.2g}" if fit.sigma_max is not None else "?"
    return f"moves sigma_max of {block} from {now} to 1" + (f", {why}" if why else "")


def explain(fit: TimeFit, limit: float) -> str:
    """The chain-rule reason with the measured numbers."""
    where = f"{fit.module}" + (f" ({fit.stream})" if fit.stream != "l0" else "")
    if fit.per_step_gain == 0:  # nothing passes back: no slope to fit
        text = (
            f"In {where}, ||dL/dh_t|| is exactly 0 at every one of the {fit.seq_len - 1} steps "
            "before the last: no gradient passes back through time at all, and only the last "
            "input affects the weight gradient. "
        )
    else:
        text = (
            f"In {where}, ||dL/dh_t|| shrinks by a factor {fit.per_step_gain:.3g} per step "
            f"going back in time (least-squares fit over {fit.seq_len} steps, "
            f"{sci(fit.total_gain)} across the sequence); "
        )
    if fit.per_step_gain == 0:
        pass
    elif fit.horizon is not None:
        text += (
            f"it falls below {sci(limit)} of its last-step value after {fit.horizon} steps, "
            f"so inputs further back barely affect the weight gradient. "
        )
    else:
        text += "the fitted decay crosses the threshold within the sequence. "
    sigma, rho = fit.sigma_max, fit.spectral_radius
    if fit.kind == "rnn" and sigma is not None:
        gamma = fit.gamma or 1.0
        text += (
            f"Each step multiplies the gradient by diag({fit.nonlinearity}'(a_t)) W_hh^T, whose "
            f"norm is at most gamma * sigma_max = {gamma:g} * {sigma:.3g}. "
        )
        if sigma < 1 / gamma:
            text += (
                f"sigma_max(W_hh) = {sigma:.3g} < 1/gamma = {1 / gamma:g} is sufficient for "
                "vanishing (Pascanu et al. 2013)."
            )
        elif rho is not None and rho < 1 and fit.per_step_gain > 0:
            text += (
                f"sigma_max(W_hh) = {sigma:.3g} >= 1/gamma does not bound it below 1, but over "
                f"many steps the product shrinks at W_hh's spectral radius rho = {rho:.3g} < 1 "
                f"per step (measured {fit.per_step_gain:.3g}): the decay comes from W_hh "
                "(Pascanu et al. 2013)."
            )
        else:
            text += (
                f"sigma_max(W_hh) = {sigma:.3g} >= 1/gamma, so the decay comes from the "
                f"activation's slope (saturation, spectral radius {rho:.3g}), not from W_hh alone"
            )
            text += (
                f": {fit.nonlinearity}' is exactly 0 in float32 once |a_t| > 9, which weights "
                "this large reach on every unit."
                if fit.per_step_gain == 0 and sigma > 10
                else "."
            )
    elif fit.kind == "lstm":
        f = fit.gates.get("forget_gate_mean")
        text += (
            "Along the cell state the gradient is multiplied element-wise by the forget gate "
            "at every step (dc_{t-1} = f_t * dc_t + ...)"
        )
        if f is not None:
            text += (
                f"; the forget gate averages {f:.3g} "
                f"(std {fit.gates.get('forget_gate_std', 0):.2g}),"
                f" so the cell path alone shrinks ~{f:.2g}x per step. The LSTM's protection "
                "against vanishing (R8) holds only while the forget gate stays near 1."
            )
        else:
            text += "."
    elif fit.kind == "gru":
        z = fit.gates.get("update_gate_mean")
        text += "The GRU's direct path h_{t-1} -> h_t is scaled by the update gate z_t (R9)"
        text += (
            f"; z averages {z:.3g} (PyTorch's z is the fraction of the old state kept), far "
            "from the copy regime z = 1."
            if z is not None
            else "."
        )
    if gate_learns(fit):
        text += (
            f" The gate is still open (mean >= {GATE_LEARNS:g}), so its bias can learn a "
            "longer memory if the task rewards one"
            + ("; the forget bias below starts it there." if fit.kind == "lstm" else ".")
        )
    return text


@register(
    Problem.VANISHING_IN_TIME,
    needs=("recurrent",),
    why=NO_RECURRENT,
)
def detect(rows: Sequence[Mapping[str, Any]], config: DiagnosisConfig) -> list[Finding]:
    """One finding per recurrent module whose gradient dies out within the sequence."""
    limit = config.vanishing_gain
    severe = 10.0**-config.severe_gain_decades
    findings = []
    for module, series, alone in module_series(rows, config):
        points = []
        for p in series:
            bad = any(fades(f, limit) for f in p.fits)
            own = alone.get(p.index, p)
            value = min(f.total_gain for f in own.fits)
            points.append(Point(p.index, p.step, bad, value))
        ep = episode(points, smaller, "total_gain")
        if ep is None:
            continue
        last = next(p for p in reversed(series) if any(fades(f, limit) for f in p.fits))
        fits = list(last.fits)
        worst = min((f for f in fits if fades(f, limit)), key=lambda f: f.total_gain)
        peak = ep.peak_value if ep.peak_value is not None else worst.total_gain
        evidence = worst.evidence({f.stream: f.per_step_gain for f in fits})
        evidence["peak_total_gain"] = peak
        findings.append(
            Finding(
                problem=Problem.VANISHING_IN_TIME,
                severity=Severity.CRITICAL if peak < severe else Severity.WARNING,
                layers=[module],
                evidence=evidence,
                explanation=explain(worst, limit),
                remedies=tailored(remedies(worst, limit), setup_of(config)),
                step=worst.step,
                episode=ep,
            )
        )
    return findings
