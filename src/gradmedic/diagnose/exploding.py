"""Exploding gradients: the delta grows by orders of magnitude toward the input (K1).

Weight gradients alone can hide it: with ReLU and N(0, 1) weights the forward
activations grow exactly as fast as the deltas shrink toward the output, so
``||dL/dW_l|| ~ ||delta_l|| ||h_{l-1}||`` is balanced across layers while the
delta itself grows ~sqrt(n/2) per layer toward the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.gain import gain_finding
from gradmedic.diagnose.registry import register
from gradmedic.diagnose.suggest import suggested
from gradmedic.findings import Finding, Problem, Remedy
from gradmedic.remedies import catalog

Rows = Sequence[Mapping[str, Any]]


def make_remedies(rows: Rows) -> Any:
    """The ranker for :func:`gain_finding`, closed over the rows for the clip threshold."""

    def rank(kind: str | None, config: DiagnosisConfig) -> list[Remedy]:
        scheme = "xavier" if kind in {"Sigmoid", "Tanh", "Softsign", "Hardtanh"} else "he"
        out = []
        if (config.context.get("structure") or {}).get("residual"):
            # a residual block multiplies by I + J_f: a per-layer init does not bound it
            out.append(
                catalog.init_scheme(
                    "residual_zero",
                    "each block x + f(x) starts as the identity, so the stack no longer "
                    "multiplies the gradient at every block (R1, R4)",
                )
            )
        out.append(
            catalog.init_scheme(scheme, "brings each layer's gain |w| * phi' back to ~1 (R4)")
        )
        s = suggested(rows, config)
        if s.clip_norm is not None:
            out.append(
                catalog.clip_norm(
                    s.clip_norm, f"caps the step whatever the gradient's size: {s.clip_why} (R7)"
                )
            )
        out += [
            catalog.normalization("batch", "rescales every layer's signal to unit size (R6)"),
            catalog.weight_decay(1e-4, "keeps the weight norms, hence the product, small (R5)"),
        ]
        return out

    return rank


@register(
    Problem.EXPLODING,
    needs=("delta_norm", "grad_norm"),
    why="no `delta_norm` or `grad_norm` key: the per-layer gradient profile was not recorded",
)
def detect(rows: Rows, config: DiagnosisConfig) -> list[Finding]:
    """Exploding when the fitted total gain of the delta profile is above ``exploding_gain``."""
    return gain_finding(rows, config, Problem.EXPLODING, make_remedies(rows))
