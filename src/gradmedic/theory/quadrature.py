"""Gaussian expectations ``E_z[f(sqrt(q) z)]``, ``z ~ N(0, 1)``, by piecewise Gauss-Legendre rules.

Plain Gauss-Hermite quadrature converges only like ``O(1/n)`` on the step in
ReLU' (0.4 % error with 256 nodes on ``E[elu'(z)^2]``). Every activation here is
smooth except at 0, so each integral is split at the kink and each piece,
truncated at ``|z| = 12`` (Gaussian mass beyond: ``< 1e-32``) and cut again at
``|sqrt(q) z| = 30`` (beyond which every activation is linear or constant to
``e^-30``), gets its own Gauss-Legendre rule; every piece is analytic, so the rule converges
exponentially (agreement with ``scipy.integrate.quad`` to ~1e-12 in the tests).

For two correlated pre-activations ``u1 = s z1``, ``u2 = s (c z1 + sqrt(1-c^2) z2)``
the inner integral over ``z2`` is split where ``u2 = 0``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

Array = np.ndarray
_Z_MAX = 12.0
_NODES = 64
# Activations vary on |x| < ~30 and are linear or constant (to e^-30) beyond.
_FEATURE = 30.0
# Scales sqrt(q) are clamped so that q = 0 and q = inf give the one-sided limits.
_S_MIN, _S_MAX = 1e-150, 1e150

_x, _v = np.polynomial.legendre.leggauss(_NODES)


def _pdf(z: Array) -> Array:
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _rule(center: Array, width: Array | float) -> tuple[Array, Array]:
    """Nodes and weights for ``int f(z) pdf(z) dz`` (shape ``center.shape + (4n,)``).

    The line is cut at ``center`` (the kink) and at ``center -+ width``: the
    pieces next to the kink resolve features of size ``width`` (an activation of
    ``sqrt(q) z`` varies on the scale ``1/sqrt(q)`` in ``z``).
    """
    c = np.clip(np.asarray(center, dtype=np.float64), -_Z_MAX, _Z_MAX)[..., None]
    w = np.asarray(width, dtype=np.float64)[..., None]
    cuts = [
        np.full_like(c, -_Z_MAX),
        np.maximum(c - w, -_Z_MAX),
        c,
        np.minimum(c + w, _Z_MAX),
        np.full_like(c, _Z_MAX),
    ]
    nodes, weights = [], []
    for lo, hi in itertools.pairwise(cuts):
        half = 0.5 * (hi - lo)
        nodes.append(0.5 * (hi + lo) + half * _x)
        weights.append(half * _v)
    z = np.concatenate(nodes, axis=-1)
    w = np.concatenate(weights, axis=-1) * _pdf(z)
    return z, w / w.sum(axis=-1, keepdims=True)  # E[1] = 1 to the last bit


def scale(q: float | Array) -> Array:
    """``sqrt(q)`` clamped to ``[1e-150, 1e150]``, so that 0 and inf give one-sided limits."""
    return np.clip(np.sqrt(np.asarray(q, dtype=np.float64)), _S_MIN, _S_MAX)


def gaussian_expectation(f: Callable[[Array], Array], q: float | Array) -> Array:
    """``E_z[f(sqrt(q) z)]`` for ``z ~ N(0, 1)``, vectorized over ``q``.

    Args:
        f: Elementwise function of float64 arrays (smooth except possibly at 0).
        q: Variance(s) ``>= 0``; ``0`` and ``inf`` give the limits ``q -> 0+`` and
            ``q -> inf`` of quantities that have them (e.g. ``E[relu'(h)^2] = 1/2``).

    Returns:
        An array of the shape of ``q``.

    Example:
        >>> round(float(gaussian_expectation(lambda x: x**2, 3.0)), 12)  # E[h^2] = q
        3.0
    """
    s = scale(q)
    z, w = _rule(np.zeros_like(s), _FEATURE / s)
    return (f(s[..., None] * z) * w).sum(axis=-1)


def bivariate_expectation(
    f: Callable[[Array], Array], g: Callable[[Array], Array], q: float, c: float
) -> float:
    """``E[f(u1) g(u2)]`` for ``(u1, u2)`` Gaussian, variances ``q``, correlation ``c``.

    ``u1 = sqrt(q) z1`` and ``u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2)``.
    """
    c = float(np.clip(c, -1.0, 1.0))
    s = float(scale(q))
    r = math.sqrt(max(0.0, 1.0 - c * c))
    if r < 1e-12:
        return float(gaussian_expectation(lambda x: f(x) * g(math.copysign(1.0, c) * x), q))
    z1, w1 = _rule(np.array(0.0), _FEATURE / s)
    # inner rule over z2, one row per z1 node, cut where u2 = 0
    z2, w2 = _rule(-c * z1 / r, _FEATURE / (s * r))
    inner = (g(s * (c * z1[:, None] + r * z2)) * w2).sum(axis=1)
    return float((f(s * z1) * inner) @ w1)
