"""Mean-field signal and gradient propagation through a deep fully connected stack.

Layer ``l`` computes ``h_{l+1} = W_{l+1} phi(h_l) + b_{l+1}`` with
``W_ij ~ N(0, sigma_w^2 / fan_in)`` and ``b_i ~ N(0, sigma_b^2)``. For wide
layers each pre-activation is Gaussian, ``h ~ N(0, q_l)``, and (Poole et al.
2016, "Exponential expressivity in deep neural networks through transient
chaos"; Schoenholz et al. 2017, "Deep information propagation"):

* variance map: ``q_{l+1} = V(q_l) = sigma_w^2 E_z[phi(sqrt(q_l) z)^2] + sigma_b^2``,
  ``z ~ N(0, 1)``; ``q*`` is the fixed point reached by iterating from ``q0``.
  ``E[phi^2]`` is the raw second moment: no mean is subtracted, also for
  activations with ``E[phi] != 0`` (sigmoid, ReLU), because with zero-mean
  weights ``Var(h_{l+1}) = sigma_w^2 E[phi(h_l)^2] + sigma_b^2`` exactly.
* gradient gain: backpropagation gives ``delta_l = phi'(h_l) * W_{l+1}^T delta_{l+1}``, so
  ``E||delta_l||^2 / E||delta_{l+1}||^2 = chi(q_l) = sigma_w^2 E[phi'(h_l)^2]``,
  ``h_l ~ N(0, q_l)``. At the fixed point this is ``chi = chi_1``; the per-layer
  gain of the gradient *norm* is ``sqrt(chi)``. ``chi < 1``: ordered phase,
  gradients vanish; ``chi > 1``: chaotic phase, gradients explode; ``chi = 1``:
  critical (edge of chaos).
* depth scales (Schoenholz et al. 2017, eqs. 5-9):
  ``xi_q = -1 / log V'(q*)`` with ``V'(q) = sigma_w^2 E[phi'^2 + phi phi'']``
  (computed as ``sigma_w^2 E[z phi phi'] / sqrt(q)``, Stein's lemma);
  ``xi_c = -1 / log chi_c*`` with ``chi_c = sigma_w^2 E[phi'(u1) phi'(u2)]`` at the
  stable fixed point ``c*`` of the correlation map
  ``c -> (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*`` (``c* = 1`` and
  ``chi_c* = chi`` in the ordered phase); and the gradient depth scale
  ``xi_grad = 1 / |log chi|``: the squared gradient norm changes by a factor
  ``e`` every ``xi_grad`` layers (the norm every ``2 xi_grad`` layers).

Fixed points without a finite positive value are reported as such:
``fixed_point`` returns ``0.0`` when ``q`` decays to 0 (e.g. ``phi(0) = 0``,
``sigma_b = 0``, ``chi <= 1``), ``math.inf`` when it grows without bound (e.g.
ReLU with ``sigma_w^2 > 2``: ``V(q) = sigma_w^2 q / 2 + sigma_b^2``), and ``q0``
itself when every ``q`` is fixed (neutral: linear with ``sigma_w = 1`` or ReLU
with ``sigma_w^2 = 2``, both with ``sigma_b = 0``). :func:`fixed_point_kind`
names the case. ``chi`` at ``q* = 0`` or ``inf`` is the limit ``q -> 0+`` or
``q -> inf`` (for ReLU ``sigma_w^2 / 2`` in all cases).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gradmedic.theory.activations import Activation, get_activation
from gradmedic.theory.quadrature import bivariate_expectation, gaussian_expectation, scale

ActivationLike = str | Activation
FixedPointKind = Literal["finite", "zero", "infinite", "neutral"]
Phase = Literal["ordered", "critical", "chaotic"]

_REL_TOL = 1e-12  # |V(q) - q| below this * q counts as zero (quadrature noise)
_SCAN = 600  # grid points per direction when bracketing the fixed point
_SPAN = 1e30  # how far (as a factor of q0) the scan looks for a fixed point
CRITICAL_TOL = 1e-6  # |chi - 1| at or below this counts as critical


def _check_sigma(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_q(name: str, value: float) -> float:
    value = _check_sigma(name, value)
    if value == 0:
        raise ValueError(f"{name} must be > 0 (a variance), got 0")
    return value


def variance_map(
    activation: ActivationLike, q: float | np.ndarray, sigma_w: float, sigma_b: float = 0.0
) -> np.ndarray:
    """``V(q) = sigma_w^2 E_z[phi(sqrt(q) z)^2] + sigma_b^2`` (Poole et al. 2016, eq. 3).

    Example:
        >>> round(float(variance_map("relu", 2.0, sigma_w=1.0)), 12)  # sigma_w^2 q / 2
        1.0
    """
    act = get_activation(activation)
    sw, sb = _check_sigma("sigma_w", sigma_w), _check_sigma("sigma_b", sigma_b)
    return sw * sw * gaussian_expectation(lambda x: act.fn(x) ** 2, q) + sb * sb


def chi_at(activation: ActivationLike, q: float | np.ndarray, sigma_w: float) -> np.ndarray:
    """``sigma_w^2 E[phi'(h)^2]``, ``h ~ N(0, q)``: the mean squared gradient gain of one layer.

    Example:
        >>> float(chi_at("linear", 5.0, sigma_w=0.5))
        0.25
    """
    act = get_activation(activation)
    sw = _check_sigma("sigma_w", sigma_w)
    return sw * sw * gaussian_expectation(lambda x: act.derivative(x) ** 2, q)


def _slope(act: Activation, q: float, sw2: float) -> float:
    """``V'(q) = sigma_w^2 E[z phi(sqrt(q) z) phi'(sqrt(q) z)] / sqrt(q)`` (Stein's lemma)."""

    def odd_part(x: np.ndarray) -> np.ndarray:  # the even part of phi phi' has E[z .] = 0
        return x * (act.fn(x) * act.derivative(x) - act.fn(-x) * act.derivative(-x)) / 2

    s = float(scale(q))
    return sw2 * float(gaussian_expectation(odd_part, q)) / (s * s)


def _bisect(f: Callable[[float], float], lo: float, hi: float, atol: float = 1e-300) -> float:
    """A root of ``f`` between ``lo`` (where ``f > 0``) and ``hi`` (where ``f <= 0``)."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if abs(hi - lo) <= 1e-14 * max(abs(lo), abs(hi)) + atol:
            break
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _fixed_point(act: Activation, sw: float, sb: float, q0: float) -> tuple[float, FixedPointKind]:
    sw2, sb2 = sw * sw, sb * sb
    v0 = sw2 * float(act.fn(np.array(0.0))) ** 2 + sb2  # V(0), exactly

    def gap(q: float | np.ndarray) -> np.ndarray:  # V(q) - q
        return sw2 * gaussian_expectation(lambda x: act.fn(x) ** 2, q) + sb2 - q

    g0 = float(gap(q0))
    if abs(g0) <= _REL_TOL * q0:
        return q0, "neutral" if abs(_slope(act, q0, sw2) - 1.0) <= 1e-9 else "finite"
    if g0 > 0:  # q grows towards the first fixed point above q0
        grid = np.geomspace(q0, q0 * _SPAN, _SCAN)
        below = np.nonzero(gap(grid) < -_REL_TOL * grid)[0]
        if below.size == 0:
            return math.inf, "infinite"
        i = int(below[0])
        return _bisect(lambda q: float(gap(q)), float(grid[i - 1]), float(grid[i])), "finite"
    # q shrinks towards the first fixed point below q0 (V(0) >= 0 guarantees one in [0, q0])
    grid = np.geomspace(q0, q0 / _SPAN, _SCAN)
    above = np.nonzero(gap(grid) > _REL_TOL * grid)[0]
    if above.size:
        i = int(above[0])
        return _bisect(lambda q: float(gap(q)), float(grid[i]), float(grid[i - 1])), "finite"
    if v0 == 0.0:
        return 0.0, "zero"
    return _bisect(lambda q: v0 if q == 0 else float(gap(q)), 0.0, float(grid[-1])), "finite"


def fixed_point(
    activation: ActivationLike, sigma_w: float, sigma_b: float = 0.0, q0: float = 1.0
) -> float:
    """The fixed point ``q*`` that iterating ``q -> V(q)`` from ``q0`` converges to.

    Found by scanning ``V(q) - q`` geometrically from ``q0`` in the direction the
    iteration moves, then bisection. Returns ``0.0`` if ``q`` decays to zero,
    ``math.inf`` if it grows without bound, and ``q0`` if every ``q`` is fixed
    (see :func:`fixed_point_kind`).

    Args:
        activation: Name (see ``ACTIVATIONS``) or an ``Activation``.
        sigma_w: Weight scale: ``Var(W_ij) = sigma_w^2 / fan_in``.
        sigma_b: Bias standard deviation.
        q0: Starting pre-activation variance.

    Example:
        >>> round(fixed_point("relu", 1.0, sigma_b=0.5), 6)  # sigma_b^2 / (1 - sigma_w^2 / 2)
        0.5
    """
    act = get_activation(activation)
    sw, sb = _check_sigma("sigma_w", sigma_w), _check_sigma("sigma_b", sigma_b)
    return _fixed_point(act, sw, sb, _check_q("q0", q0))[0]


def fixed_point_kind(
    activation: ActivationLike, sigma_w: float, sigma_b: float = 0.0, q0: float = 1.0
) -> FixedPointKind:
    """How ``q`` behaves under iteration: ``"finite"``, ``"zero"``, ``"infinite"`` or ``"neutral"``.

    ``"neutral"``: ``V(q) = q`` around ``q0`` with slope 1, every ``q`` is fixed
    (linear with ``sigma_w = 1`` or ReLU with ``sigma_w^2 = 2``, ``sigma_b = 0``).

    Example:
        >>> fixed_point_kind("relu", 1.5)
        'infinite'
    """
    act = get_activation(activation)
    sw, sb = _check_sigma("sigma_w", sigma_w), _check_sigma("sigma_b", sigma_b)
    return _fixed_point(act, sw, sb, _check_q("q0", q0))[1]


def chi(activation: ActivationLike, sigma_w: float, sigma_b: float = 0.0, q0: float = 1.0) -> float:
    """``chi = sigma_w^2 E[phi'(sqrt(q*) z)^2]``: mean squared gradient gain per layer at ``q*``.

    The per-layer gain of the gradient norm is ``sqrt(chi)``. ReLU:
    ``sigma_w^2 / 2``; linear: ``sigma_w^2``; tanh at ``sigma_w = 1, sigma_b = 0``: 1.

    Example:
        >>> chi("relu", 2.0)
        2.0
    """
    act = get_activation(activation)
    sw, sb = _check_sigma("sigma_w", sigma_w), _check_sigma("sigma_b", sigma_b)
    q_star, _ = _fixed_point(act, sw, sb, _check_q("q0", q0))
    return float(chi_at(act, q_star, sw))


def phase(chi_value: float, tol: float = CRITICAL_TOL) -> Phase:
    """``"ordered"`` (``chi < 1``, vanishing), ``"critical"`` or ``"chaotic"`` (exploding)."""
    if abs(chi_value - 1.0) <= tol:
        return "critical"
    return "ordered" if chi_value < 1.0 else "chaotic"


@dataclass(frozen=True)
class DepthScales:
    """Depth scales of Schoenholz et al. 2017 (in layers; ``inf`` at criticality).

    Attributes:
        xi_q: Layers over which ``q`` approaches ``q*`` (``nan`` when ``q*`` is infinite).
        xi_c: Layers over which correlations between inputs approach ``c*``
            (``nan`` when ``q*`` is infinite or zero in the chaotic phase).
        xi_grad: ``1 / |log chi|``: layers per factor ``e`` in the squared gradient norm.
    """

    xi_q: float
    xi_c: float
    xi_grad: float


def _scale_of(rate: float) -> float:
    """``1 / |log rate|``: layers per factor ``e`` (0 for a rate of 0, inf for a rate of 1)."""
    if rate <= 0:
        return 0.0
    return math.inf if abs(math.log(rate)) <= 1e-12 else 1.0 / abs(math.log(rate))


def _correlation_chi(act: Activation, sw2: float, sb2: float, q_star: float) -> float:
    """``chi_c*`` at the stable correlation fixed point ``c* < 1`` of the chaotic phase."""

    def gap(c: float) -> float:
        return (sw2 * bivariate_expectation(act.fn, act.fn, q_star, c) + sb2) / q_star - c

    hi = 1.0 - 1e-3
    c_star = hi if gap(hi) > 0 else _bisect(gap, -1.0, hi, atol=1e-11)  # gap(-1) >= 0 always
    return sw2 * bivariate_expectation(act.derivative, act.derivative, q_star, c_star)


def depth_scale(
    activation: ActivationLike, sigma_w: float, sigma_b: float = 0.0, q0: float = 1.0
) -> DepthScales:
    """The depth scales ``xi_q``, ``xi_c`` and ``xi_grad`` (formulas in the module docstring).

    Example:
        >>> round(depth_scale("relu", 1.0).xi_grad, 4)  # 1 / |log(1/2)|
        1.4427
    """
    act = get_activation(activation)
    sw, sb = _check_sigma("sigma_w", sigma_w), _check_sigma("sigma_b", sigma_b)
    q_star, kind = _fixed_point(act, sw, sb, _check_q("q0", q0))
    sw2, sb2 = sw * sw, sb * sb
    chi_1 = float(chi_at(act, q_star, sw))
    xi_grad = _scale_of(chi_1)
    xi_q = math.nan if kind == "infinite" else _scale_of(_slope(act, q_star, sw2))
    if phase(chi_1) != "chaotic":
        xi_c = xi_grad  # c* = 1 and chi_c* = chi
    elif kind in ("finite", "neutral") and q_star > 0:
        xi_c = _scale_of(_correlation_chi(act, sw2, sb2, q_star))
    else:
        xi_c = math.nan
    return DepthScales(xi_q=xi_q, xi_c=xi_c, xi_grad=xi_grad)


@dataclass(frozen=True)
class Propagation:
    """``q`` and gradient gains through a finite stack, from the input variance.

    Attributes:
        q: Pre-activation variance ``q_l`` at the output of each linear layer.
        gains: ``sqrt(chi(q_l))`` for each layer but the last: the predicted ratio
            ``||dL/dh_l|| / ||dL/dh_{l+1}||``.
    """

    q: tuple[float, ...]
    gains: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """``||dL/dh_1|| / ||dL/dh_L||``: the product of the gains."""
        return float(np.prod(self.gains)) if self.gains else 1.0

    @property
    def geometric_mean_gain(self) -> float:
        """Geometric mean of the gains (``nan`` with fewer than two layers)."""
        if not self.gains:
            return math.nan
        return float(np.exp(np.mean(np.log(np.asarray(self.gains)))))


def propagate(
    activations: Sequence[ActivationLike],
    sigma_w2: Sequence[float],
    sigma_b2: Sequence[float],
    input_variance: float = 1.0,
    input_activation: ActivationLike = "linear",
) -> Propagation:
    """Iterate the variance map layer by layer from the input (no fixed point assumed).

    For linear layers ``l = 1..L`` with ``h_l = W_l phi_{l-1}(h_{l-1}) + b_l``:
    ``q_1 = sigma_w1^2 E[phi_0(x)^2] + sigma_b1^2`` with ``x ~ N(0, input_variance)``
    and ``phi_0 = input_activation``; ``q_{l+1} = sigma_w,l+1^2 E[phi_l(h_l)^2] + sigma_b,l+1^2``;
    ``gain_l = sqrt(sigma_w,l+1^2 E[phi_l'(h_l)^2])``, ``h_l ~ N(0, q_l)``.

    Args:
        activations: ``phi_l`` after each linear layer (the last is unused).
        sigma_w2: ``fan_in * Var(W_l)`` per layer.
        sigma_b2: ``Var(b_l)`` per layer.
        input_variance: Second moment of each input component.
        input_activation: An activation applied to the input before layer 1.

    Example:
        >>> p = propagate(["relu"] * 3, [2.0] * 3, [0.0] * 3)
        >>> [round(q, 9) for q in p.q], [round(g, 9) for g in p.gains]
        ([2.0, 2.0, 2.0], [1.0, 1.0])
    """
    acts = [get_activation(a) for a in activations]
    if not (len(acts) == len(sigma_w2) == len(sigma_b2)):
        raise ValueError(
            "activations, sigma_w2 and sigma_b2 must have one entry per layer, got "
            f"{len(acts)}, {len(sigma_w2)} and {len(sigma_b2)}"
        )
    sw2 = [_check_sigma("sigma_w2", s) for s in sigma_w2]
    sb2 = [_check_sigma("sigma_b2", s) for s in sigma_b2]
    x_act = get_activation(input_activation)
    second_moment = float(
        gaussian_expectation(lambda x: x_act.fn(x) ** 2, _check_q("input_variance", input_variance))
    )
    qs: list[float] = []
    gains: list[float] = []
    for i in range(len(acts)):
        q = sw2[i] * second_moment + sb2[i]
        if qs:
            d2 = float(gaussian_expectation(_squared(acts[i - 1].derivative), qs[-1]))
            gains.append(math.sqrt(sw2[i] * d2))
        qs.append(q)
        second_moment = float(gaussian_expectation(_squared(acts[i].fn), q))
    return Propagation(q=tuple(qs), gains=tuple(gains))


def _squared(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> f(x) ** 2`` (binds ``f`` now, unlike a lambda over a loop variable)."""
    return lambda x: f(x) ** 2


def sigmoid_chain_bound(depth: int) -> float:
    """``(1/4)^depth``: the bound on a chain of ``depth`` sigmoid derivatives with ``|w| <= 1``.

    ``sigma'(z) = sigma(z)(1 - sigma(z)) <= 1/4``, so ``prod_l |w_l sigma'(z_l)| <= 4^-depth``.

    Example:
        >>> sigmoid_chain_bound(3)
        0.015625
    """
    if isinstance(depth, bool) or not isinstance(depth, int | np.integer) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
    return 0.25 ** int(depth)
