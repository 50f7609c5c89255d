"""One-call summary of the mean-field theory for a uniform deep stack (the CLI's data)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradmedic.theory.activations import get_activation
from gradmedic.theory.meanfield import (
    ActivationLike,
    DepthScales,
    Phase,
    chi,
    depth_scale,
    fixed_point,
    fixed_point_kind,
    phase,
    propagate,
)


@dataclass(frozen=True)
class TheorySummary:
    """What mean-field theory predicts for ``depth`` identical fully connected layers.

    Attributes:
        activation: Activation name.
        sigma_w: Weight scale (``Var(W) = sigma_w^2 / fan_in``).
        sigma_b: Bias standard deviation.
        depth: Number of layer-to-layer gradient gains multiplied in ``ratio``.
        q0: Input second moment (the start of the variance iteration).
        q_star: Fixed point of the variance map (0, inf or q0 as documented).
        fixed_point_kind: ``"finite"``, ``"zero"``, ``"infinite"`` or ``"neutral"``.
        chi: ``sigma_w^2 E[phi'(h)^2]`` at ``q*``.
        scales: The depth scales.
        ratio: Predicted ``||dL/dh_1|| / ||dL/dh_{depth+1}||``, iterating ``q`` from
            ``q0`` (finite depth: the fixed point is not assumed).
    """

    activation: str
    sigma_w: float
    sigma_b: float
    depth: int
    q0: float
    q_star: float
    fixed_point_kind: str
    chi: float
    scales: DepthScales
    ratio: float

    @property
    def gain(self) -> float:
        """``sqrt(chi)``: per-layer gain of the gradient norm at the fixed point."""
        return math.sqrt(self.chi)

    @property
    def phase(self) -> Phase:
        """``"ordered"``, ``"critical"`` or ``"chaotic"``."""
        return phase(self.chi)

    @property
    def verdict(self) -> str:
        """One line: the phase at ``q*`` and the gradient change over ``depth`` layers."""
        over = (
            f"over {self.depth} layers from q0 = {self.q0:g}: x{self.ratio:.3g} "
            "from the last layer back to the first"
        )
        if self.phase == "critical":
            return f"critical (chi = 1): no exponential vanishing or explosion at q*; {over}"
        if self.phase == "ordered":
            return (
                f"ordered phase (chi = {self.chi:.4g} < 1): gradients vanish, "
                f"x{self.gain:.4g} per layer at q*; {over}"
            )
        return (
            f"chaotic phase (chi = {self.chi:.4g} > 1): gradients explode, "
            f"x{self.gain:.4g} per layer at q*; {over}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON (non-finite numbers as strings)."""
        from gradmedic.findings import _plain

        return _plain(
            {
                "activation": self.activation,
                "sigma_w": self.sigma_w,
                "sigma_b": self.sigma_b,
                "depth": self.depth,
                "q0": self.q0,
                "q_star": self.q_star,
                "fixed_point_kind": self.fixed_point_kind,
                "chi": self.chi,
                "gain_per_layer": self.gain,
                "xi_q": self.scales.xi_q,
                "xi_c": self.scales.xi_c,
                "xi_grad": self.scales.xi_grad,
                "ratio": self.ratio,
                "phase": self.phase,
                "verdict": self.verdict,
            }
        )


def summarize(
    activation: ActivationLike,
    sigma_w: float,
    sigma_b: float = 0.0,
    depth: int = 50,
    q0: float = 1.0,
) -> TheorySummary:
    """Fixed point, ``chi``, depth scales and the finite-depth gradient ratio in one call.

    Example:
        >>> s = summarize("relu", 2**0.5, depth=10)
        >>> s.phase, round(s.ratio, 6)
        ('critical', 1.0)
    """
    if isinstance(depth, bool) or not isinstance(depth, int | np.integer) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    act = get_activation(activation)
    sw2, sb2 = float(sigma_w) ** 2, float(sigma_b) ** 2
    chi_value = chi(act, sigma_w, sigma_b, q0)  # validates sigma_w, sigma_b, q0
    layers = int(depth) + 1
    finite = propagate([act] * layers, [sw2] * layers, [sb2] * layers, input_variance=q0)
    return TheorySummary(
        activation=act.name,
        sigma_w=float(sigma_w),
        sigma_b=float(sigma_b),
        depth=int(depth),
        q0=float(q0),
        q_star=fixed_point(act, sigma_w, sigma_b, q0),
        fixed_point_kind=fixed_point_kind(act, sigma_w, sigma_b, q0),
        chi=chi_value,
        scales=depth_scale(act, sigma_w, sigma_b, q0),
        ratio=finite.ratio,
    )
