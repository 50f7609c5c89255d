"""Elementwise activations as NumPy functions with their derivatives.

Each :class:`Activation` evaluates ``phi`` and ``phi'`` on float64 arrays, with
the same definitions PyTorch uses (``nn.ReLU``, ``nn.ELU``, ``nn.GELU``, ...).
Where the derivative is undefined (the kink of ReLU, Leaky ReLU and ELU at 0),
the value is PyTorch's: the left-hand slope. The kink sits at 0 for every
activation here, which the quadrature relies on (it splits its integrals at 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradmedic.errors import GradmedicError

Array = np.ndarray
_erfc = np.frompyfunc(math.erfc, 1, 1)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``phi`` with its derivative ``phi'``.

    Attributes:
        name: Display name, e.g. ``"leaky_relu(slope=0.2)"``.
        fn: ``phi`` on a float64 array.
        derivative: ``phi'`` on a float64 array.
        params: The parameters it was built with.

    Example:
        >>> act = get_activation("tanh")
        >>> float(act.derivative(np.array(0.0)))
        1.0
    """

    name: str
    fn: Callable[[Array], Array] = field(repr=False, compare=False)
    derivative: Callable[[Array], Array] = field(repr=False, compare=False)
    params: tuple[tuple[str, Any], ...] = ()

    def __call__(self, x: Array) -> Array:
        """``phi(x)``."""
        return self.fn(x)


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free form of 1 / (1 + e^-x)


def _normal_cdf(x: Array) -> Array:
    return 0.5 * np.asarray(_erfc(-np.asarray(x) / math.sqrt(2.0)), dtype=np.float64)


def _linear() -> Activation:
    return Activation("linear", lambda x: 1.0 * x, lambda x: np.ones_like(x, dtype=np.float64))


def _relu() -> Activation:
    return Activation("relu", lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64))


def _leaky_relu(slope: float = 0.01) -> Activation:
    return Activation(
        f"leaky_relu(slope={slope:g})",
        lambda x: np.where(x > 0, x, slope * x),
        lambda x: np.where(x > 0, 1.0, slope),
        (("slope", slope),),
    )


def _elu(alpha: float = 1.0) -> Activation:
    return Activation(
        f"elu(alpha={alpha:g})",
        lambda x: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0))),
        lambda x: np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0.0))),
        (("alpha", alpha),),
    )


def _tanh() -> Activation:
    return Activation("tanh", np.tanh, lambda x: 1.0 - np.tanh(x) ** 2)


def _sigmoid_act() -> Activation:
    def d(x: Array) -> Array:
        s = _sigmoid(x)
        return s * (1.0 - s)

    return Activation("sigmoid", _sigmoid, d)


def _softplus(beta: float = 1.0) -> Activation:
    # torch's threshold switch (linear above beta*x = 20) differs by < e^-20.
    return Activation(
        "softplus" if beta == 1.0 else f"softplus(beta={beta:g})",
        lambda x: np.logaddexp(0.0, beta * x) / beta,
        lambda x: _sigmoid(beta * x),
        (("beta", beta),),
    )


def _gelu(approximate: str = "none") -> Activation:
    if approximate == "tanh":  # 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi)
        k = math.sqrt(2.0 / math.pi)

        def fn(x: Array) -> Array:
            return 0.5 * x * (1.0 + np.tanh(k * (x + 0.044715 * x**3)))

        def d(x: Array) -> Array:
            t = np.tanh(k * (x + 0.044715 * x**3))
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * k * (1.0 + 3 * 0.044715 * x**2)

        return Activation("gelu(tanh)", fn, d, (("approximate", "tanh"),))
    if approximate != "none":
        raise GradmedicError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return Activation(
        "gelu",
        lambda x: x * _normal_cdf(x),  # x Phi(x)
        lambda x: _normal_cdf(x) + x * _INV_SQRT2PI * np.exp(-0.5 * x * x),
    )


def _silu() -> Activation:
    def d(x: Array) -> Array:
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))

    return Activation("silu", lambda x: x * _sigmoid(x), d)


_FACTORIES: dict[str, Callable[..., Activation]] = {
    "linear": _linear,
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "tanh": _tanh,
    "sigmoid": _sigmoid_act,
    "softplus": _softplus,
    "gelu": _gelu,
    "silu": _silu,
}
_ALIASES = {"identity": "linear", "none": "linear", "swish": "silu", "leakyrelu": "leaky_relu"}

#: Names accepted by :func:`get_activation` (aliases: identity, swish, leakyrelu).
ACTIVATIONS: tuple[str, ...] = tuple(_FACTORIES)


def get_activation(activation: str | Activation, **params: Any) -> Activation:
    """Look up an activation by name (or pass an :class:`Activation` through).

    Args:
        activation: One of :data:`ACTIVATIONS` (case-insensitive, ``-`` or ``_``),
            or an :class:`Activation`.
        **params: ``slope`` for leaky_relu (default 0.01), ``alpha`` for elu
            (default 1), ``beta`` for softplus (default 1), ``approximate`` for
            gelu (``"none"`` or ``"tanh"``).

    Raises:
        GradmedicError: unknown name or parameter.
    """
    if isinstance(activation, Activation):
        if params:
            raise GradmedicError("parameters can only be given with an activation name")
        return activation
    if not isinstance(activation, str):
        raise TypeError(
            f"activation must be a name or an Activation, got {type(activation).__name__}"
        )
    key = activation.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    factory = _FACTORIES.get(key)
    if factory is None:
        raise GradmedicError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    try:
        return factory(**params)
    except TypeError:
        raise GradmedicError(
            f"activation {key!r} does not take parameters {sorted(params)}"
        ) from None


def compose(activations: Sequence[Activation]) -> Activation:
    """The activation ``phi_k o ... o phi_1`` of several applied in a row (linear if none).

    Its derivative is the chain rule ``prod_i phi_i'(phi_{i-1}(...(x)))``.
    """
    acts = tuple(activations)
    if not acts:
        return _linear()
    if len(acts) == 1:
        return acts[0]

    def fn(x: Array) -> Array:
        for a in acts:
            x = a.fn(x)
        return x

    def d(x: Array) -> Array:
        out = np.ones_like(x, dtype=np.float64)
        for a in acts:
            out = out * a.derivative(x)
            x = a.fn(x)
        return out

    return Activation(" > ".join(a.name for a in acts), fn, d)
