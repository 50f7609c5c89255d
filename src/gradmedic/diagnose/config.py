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
        saturation_critical: A saturation finding is critical when the saturated
            fraction (mean over the modules, or the episode's peak) reaches this:
            nine evaluations in ten then pass under 5% of the gradient, and the
            tanh/sigmoid nets with N(0, 1) weights that measured 0.72-0.94 stall
            from their first steps at the upper end.
        saturation_slope: The "near zero slope" rule above: 5% of the
            activation's maximal slope (tanh: |x| > 3.0, sigmoid: |x| > 4.4).
            Records hold the fraction under the rules 1%, 2%, 5%, 10% and 20%
            (``saturated_by_slope``), so it can be changed after the run; values
            between are interpolated in log slope, values outside take the
            nearest end.
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
        window: Records averaged (geometrically for gains, by the median for
            unit fractions) to decide whether a problem holds at a record:
            each record is judged on the window of measured records ending
            at it, so one odd batch neither starts nor ends an episode.
        geometric_r2: A depth profile is geometric, i.e. explained by one
            chain-rule factor per layer, when the straight-line fit of
            ``log ||delta_l||`` against depth explains at least this fraction
            of its variance. Every broken reference of the suite measured
            R^2 >= 0.99 (default-init sigmoid/tanh, tiny/huge-init ReLU).
            Pre-LN transformer LMs (2 and 6 blocks, manual SGD clipped at
            0.25) measured R^2 0.0-0.4 per record at lr 0.5 and 20, deltas or
            weight gradients alike; diverging at lr 100 single records
            reached 0.69 (deltas) and 0.83 (weight gradients only). Their
            fitted "total gain" there, up to 1e-2..1e-3, comes from a few odd
            layers (embeddings, head), not from a product through depth.
        update_ratio_healthy: The top of the healthy range of
            ``||dw|| / ||w||`` (SGD lr 0.01-0.1 measured 1e-3..2e-2): the
            learning-rate factor brings the measured ratio to it, and a
            loss that rises while every step stayed below it is not a
            step-size divergence.
        loss_window: Finite losses whose median is the smoothed loss of the
            divergence rule: one bad batch does not make a rise.
        loss_rise: A smoothed loss at least this many times the lowest
            smoothed loss before it is a several-fold rise. Healthy runs
            measured at most 1.11x (pre-LN LMs on random batches at lr 0.5
            and 20; MLPs at SGD 0.05 / Adam 1e-3 only decrease); SGD at lr
            100 on a pre-LN LM rose 7.9x by step 7 and 29x at its worst, the
            reported wikitext case 9 -> 34 -> 110. A divergence is critical
            from ``loss_rise ** 2`` (9x) or when the loss turns non-finite.
        loss_undo: ...and the rise must undo at least this fraction of the
            progress made (``(L_t - L_min) >= loss_undo * (L_0 - L_min)``),
            so that noise around a loss near 0 (0.01 -> 0.03 after starting
            at 2.3) is not a divergence, while climbing back to the starting
            loss is.
        blowup: A record whose global gradient norm is at least this many
            times the median of the earlier finite ones is a blow-up: the
            first one ends the records the suggested numbers are taken from.
            The healthy twins of tests/test_setups.py measured at most 4.8x
            (an LSTM on fresh random batches), most of them 1.0-1.5x; two
            orders of magnitude is no batch-to-batch noise.
        clip_percentile: The clip threshold is this percentile of the global
            gradient norms recorded before the first bad record: it leaves
            nine in ten healthy steps untouched and caps the spikes.
        clip_bounds: ...clamped to ``[low, high] * median`` of those norms;
            1.0 (the usual starting point: PyTorch's examples use 0.25-1,
            Hugging Face's Trainer 1.0) when there is no finite record
            before the first bad one.
        clip_fallback: That starting point: the clip threshold when no finite
            gradient norm was recorded before the first bad record.
        exploding_step_gain: A recurrent gradient growing at least this much
            per step back in time (fitted over 4 or more steps) is exploding
            in time however short the sequence: at 2x per step it passes
            ``exploding_gain`` (1e3) within 10 steps, and a longer sequence
            than the one recorded is only a data change away. A ReLU RNN
            whose W_hh has every singular value at 3.5 measured 2.7x per step
            (55x over 5 steps, loss 140x the mean predictor's, diverging at
            step 4 under SGD lr 0.01); default-init RNNs measure 0.4-0.6x,
            orthogonal W_hh about 1.
        lr_factor_bounds: The suggested learning-rate factor stays in
            ``[low, high]``: a practitioner lowers by 2x-100x at a time and
            re-measures; a factor outside says the measurement was wrong
            (1e-30 from a zero-initialized layer), not the lr.
        update_ratio_small: A run whose largest per-layer ``||dw|| / ||w||``
            has a median below this (a hundredth of the healthy 1e-2) takes
            steps too small to learn in (``small_steps``), when its loss
            also stays above ``small_steps_loss`` of its start.
        small_steps_loss: ...the mean loss of the last tenth of the records
            over the first tenth's: at least this (fell by 10% or less).
        lr_raise_bounds: The suggested learning-rate raise stays in
            ``[low, high]`` (3x..100x): bigger jumps say the measurement, not
            the lr, is wrong.
        context: Model-derived facts that the rows do not hold, e.g.
            ``{"activations": {layer: "Sigmoid"}, "weight_scale": {layer: s},
            "forward_order": [module, ...], "structure": {...}, "optimizer":
            {...} or None}`` (docs/diagnosis.md, "Model context"); detectors
            work without it.
    """

    # depth profiles (vanishing, exploding)
    vanishing_gain: float = 1e-3
    exploding_gain: float = 1e3
    severe_gain_decades: float = 6.0
    # units (dead, saturated)
    dead_fraction: float = 0.7
    dead_critical: float = 0.95
    saturation_fraction: float = 0.5
    saturation_slope: float = 0.05
    # update sizes (unstable updates)
    update_ratio_spike: float = 1.0
    update_ratio_sustained: float = 0.3
    update_window: int = 5
    # every detector: the records a verdict is taken on; what counts as geometric
    window: int = 5
    geometric_r2: float = 0.5
    update_ratio_healthy: float = 1e-2
    # the loss (divergence) and the global norm (blow-ups)
    loss_window: int = 3
    loss_rise: float = 3.0
    loss_undo: float = 0.5
    blowup: float = 100.0
    # the suggested clip threshold and learning-rate factor
    clip_percentile: float = 90.0
    clip_bounds: tuple[float, float] = (1e-3, 1e3)
    lr_factor_bounds: tuple[float, float] = (0.01, 0.5)
    # steps too small to learn in
    update_ratio_small: float = 1e-4
    small_steps_loss: float = 0.9
    lr_raise_bounds: tuple[float, float] = (3.0, 100.0)
    # added later, kept last so positional arguments keep their meaning
    saturation_critical: float = 0.9
    clip_fallback: float = 1.0
    exploding_step_gain: float = 2.0
    context: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.vanishing_gain < 1:
            raise ValueError(f"vanishing_gain must be in (0, 1), got {self.vanishing_gain}")
        if self.exploding_gain <= 1:
            raise ValueError(f"exploding_gain must be > 1, got {self.exploding_gain}")
        if self.exploding_step_gain <= 1:
            raise ValueError(f"exploding_step_gain must be > 1, got {self.exploding_step_gain}")
        units = ("dead_fraction", "dead_critical", "saturation_fraction", "saturation_critical")
        for name in (*units, "saturation_slope"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not 0 <= self.geometric_r2 <= 1:
            raise ValueError(f"geometric_r2 must be in [0, 1], got {self.geometric_r2}")
        if self.loss_rise <= 1 or self.blowup <= 1:
            raise ValueError("loss_rise and blowup must be > 1")
        if not self.clip_fallback > 0:
            raise ValueError(f"clip_fallback must be > 0, got {self.clip_fallback}")
        if not 0 < self.clip_percentile <= 100:
            raise ValueError(f"clip_percentile must be in (0, 100], got {self.clip_percentile}")
        if not 0 < self.update_ratio_small < self.update_ratio_healthy:
            raise ValueError("update_ratio_small must be in (0, update_ratio_healthy)")
        if not 0 < self.small_steps_loss <= 1:
            raise ValueError(f"small_steps_loss must be in (0, 1], got {self.small_steps_loss}")
        if not 1 < self.lr_raise_bounds[0] <= self.lr_raise_bounds[1]:
            raise ValueError("lr_raise_bounds must be (low, high) with 1 < low <= high")
        for name in ("clip_bounds", "lr_factor_bounds"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high")
        for name in ("update_window", "window", "loss_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
