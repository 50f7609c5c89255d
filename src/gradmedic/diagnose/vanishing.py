"""Vanishing gradients: the delta shrinks by orders of magnitude toward the input (K1, K2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.gain import gain_finding
from gradmedic.diagnose.registry import register
from gradmedic.findings import Finding, Problem, Remedy
from gradmedic.remedies import catalog


def remedies(kind: str | None, config: DiagnosisConfig) -> list[Remedy]:
    """Ranked cures: remove the shrinking factor first, then bypass it."""
    out: list[Remedy] = []
    if kind in {"Sigmoid", "Tanh"}:
        out.append(
            catalog.swap_activation(kind, "ReLU", "ReLU's slope is exactly 1 where active (R2)")
        )
        out.append(catalog.init_scheme("he", "after the swap, keeps each layer's gain at 1 (R4)"))
    else:
        scheme = "he" if kind is None or kind not in {"Hardtanh", "Softsign"} else "xavier"
        out.append(catalog.init_scheme(scheme, "scales |w| so each layer's gain is ~1 (R4)"))
    out.append(catalog.normalization("batch", "rescales every layer's signal to unit size (R6)"))
    out.append(catalog.residual("an identity path whose Jacobian is 1 skips the shrinking (R1)"))
    return out


@register(
    Problem.VANISHING,
    needs=("delta_norm", "grad_norm"),
    why="no `delta_norm` or `grad_norm` key: the per-layer gradient profile was not recorded",
)
def detect(rows: Sequence[Mapping[str, Any]], config: DiagnosisConfig) -> list[Finding]:
    """Vanishing when the fitted total gain of the delta profile is below ``vanishing_gain``."""
    return gain_finding(rows, config, Problem.VANISHING, remedies)
