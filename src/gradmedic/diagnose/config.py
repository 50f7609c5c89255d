"""Detector thresholds, each with the reasoning or measurement behind it.

The thresholds come from chain-rule magnitudes and from measurements on
networks known to be healthy, never from fitting a test suite. The numbers
quoted below were measured with PyTorch 2 on CPU, batch 64, inputs N(0, 1)
(see docs/diagnosis.md for the script and the full table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DiagnosisConfig:
    """Thresholds of the detectors, plus the model-derived context they may use.

    Attributes:
        vanishing_gain: A stack whose input-side layer receives less than this
            fraction of the output-side layer's delta ``||dL/dh||`` is
            vanishing. With one learning rate for all layers, a layer getting
            1e-3 of the gradient moves 1000x slower: 1000 steps of training
            change it as much as one step changes the output side (K4).
            Healthy references stay two orders of magnitude inside: a
            He-initialized ReLU MLP of depth 100 measured a total gain of
            0.56 (fitted over the layers), Xavier-tanh (gain 5/3) of depth 50
            a gain of 115 (chaotic phase, per-layer 1.10), residual nets with
            normalization about 1. Broken references sit far outside: a
            20-layer sigmoid MLP at PyTorch's default init 7e-17 (per-layer
            0.14, i.e. sigma' <= 1/4 times |w| ~ 0.58), a default-init ReLU
            MLP of depth 20 3e-8 (per-layer sqrt(1/6) = 0.41).
        exploding_gain: The mirror image: the input-side delta more than 1e3
            times the output-side one. A ReLU MLP with N(0, 1) weights of
            width n multiplies the delta by sqrt(n/2) per layer (11 at
            n = 256): 10 layers measured 2e9.
        severe_gain_decades: A finding becomes critical when the total gain
            is this many decades beyond 1 (1e-6 / 1e6): a layer learning a
            million times slower does not learn in any realistic run, and a
            delta a million times larger overflows float16 (max 65504) as
            soon as the output-side gradient exceeds ~0.07.
        dead_fraction: A layer is reported when at least this fraction of
            its units had slope exactly 0 for every input of the recorded
            window. Independent units with ReLU's activation probability
            1/2 are silent over a batch of B inputs with probability 2^-B,
            but depth correlates the inputs (the correlation map converges
            to 1, Schoenholz et al. 2017): He-initialized ReLU MLPs measured
            up to 0.26 (depth 20), 0.52 (depth 50, width 64) and 0.55
            (depth 100) silent units in one layer over a batch of 64 while
            healthy. 0.7 stays above that; a negative bias larger than the
            pre-activation spread silences >= 0.95.
        dead_critical: Above this fraction the layer passes almost no
            gradient to anything below it (each dead unit zeroes a row of
            the layer's Jacobian).
        saturation_fraction: A bounded activation (sigmoid, tanh, hardtanh,
            ...) is saturated when at least this fraction of its evaluations
            have ``|phi'(x)| < saturation_slope * max phi'``. Over half the
            units then pass less than 5% of the gradient they could, and
            their incoming weights barely learn (K3). Measured: Xavier-tanh
            (gain 5/3) at most 0.29 in any layer; tanh/sigmoid with N(0, 1)
            weights 0.72-0.94.
        saturation_slope: The "near zero slope" rule above: 5% of the
            activation's maximal slope (tanh: |x| > 3.0, sigmoid: |x| > 4.4).
        update_ratio_spike: One recorded step whose ``||dw|| / ||w||`` is at
            least 1 in some layer replaced that layer's weights by a step
            larger than the weights themselves: the local (linear) model of
            the loss that the step relies on cannot hold there (K6).
        update_ratio_sustained: The median over the last
            ``update_window`` records of the largest per-layer ratio. Healthy
            training sits at 1e-3..1e-2 (SGD lr 0.01-0.1 measured 1e-3-2e-2);
            Adam lr 1e-3 measured 0.02-0.05 and up to 0.11 on its first steps
            in a 4096-wide layer (its first step moves each weight by ~lr).
            At 0.3 per step a layer is rewritten within ~3 steps; SGD at a
            learning rate that later diverges (lr 5 on a ReLU MLP) measured
            0.4-0.9 from its first step, 14 steps before the loss was NaN.
        update_window: Records in the median above; it needs at least
            ``min(update_window, 3)`` records so that Adam's large first step
            alone does not fire it.
        window: Records (the latest ones) averaged, geometrically, for the
            per-layer delta and gradient profiles and the activation
            fractions.
        context: Model-derived facts that the rows do not hold, e.g.
            ``{"activations": {layer: "Sigmoid"}, "weight_scale": {layer: s},
            "forward_order": [module, ...]}``; detectors work without it.
    """

    vanishing_gain: float = 1e-3
    exploding_gain: float = 1e3
    severe_gain_decades: float = 6.0
    dead_fraction: float = 0.7
    dead_critical: float = 0.95
    saturation_fraction: float = 0.5
    saturation_slope: float = 0.05
    update_ratio_spike: float = 1.0
    update_ratio_sustained: float = 0.3
    update_window: int = 5
    window: int = 5
    context: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.vanishing_gain < 1:
            raise ValueError(f"vanishing_gain must be in (0, 1), got {self.vanishing_gain}")
        if self.exploding_gain <= 1:
            raise ValueError(f"exploding_gain must be > 1, got {self.exploding_gain}")
        for name in ("dead_fraction", "dead_critical", "saturation_fraction", "saturation_slope"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for name in ("update_window", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
