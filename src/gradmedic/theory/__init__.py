"""Mean-field theory of signal and gradient propagation in deep fully connected nets.

For ``h_{l+1} = W_{l+1} phi(h_l) + b_{l+1}``, ``W_ij ~ N(0, sigma_w^2 / fan_in)``,
``b_i ~ N(0, sigma_b^2)``, wide layers, ``z ~ N(0, 1)`` (Poole et al. 2016,
"Exponential expressivity in deep neural networks through transient chaos";
Schoenholz et al. 2017, "Deep information propagation"):

* variance map ``q_{l+1} = sigma_w^2 E[phi(sqrt(q_l) z)^2] + sigma_b^2``, fixed point ``q*``
  (:func:`variance_map`, :func:`fixed_point`; 0 / inf / neutral cases documented there);
* ``chi = sigma_w^2 E[phi'(sqrt(q*) z)^2]``: mean squared gradient gain per layer; the
  gradient norm gains ``sqrt(chi)`` per layer (:func:`chi`, :func:`chi_at`);
* depth scales ``xi_q = -1/log V'(q*)``, ``xi_c = -1/log chi_c*``,
  ``xi_grad = 1/|log chi|`` (:func:`depth_scale`);
* a real model's per-layer gains from its actual weights, iterating ``q`` from the
  input variance (:func:`predicted_gain`);
* closed forms: :func:`sigmoid_chain_bound` ``= 4^-depth`` (``sigma' <= 1/4``), and
  each activation's derivative (``get_activation(name).derivative``).

Expectations use piecewise Gauss-Legendre quadrature split at the activations'
kink at 0 (see :mod:`gradmedic.theory.quadrature`).

Example:
    >>> from gradmedic import theory
    >>> round(theory.chi("relu", sigma_w=2**0.5), 12)  # He initialization is critical
    1.0
"""

from __future__ import annotations

from gradmedic.theory.activations import ACTIVATIONS, Activation, compose, get_activation
from gradmedic.theory.meanfield import (
    DepthScales,
    Propagation,
    chi,
    chi_at,
    depth_scale,
    fixed_point,
    fixed_point_kind,
    phase,
    propagate,
    sigmoid_chain_bound,
    variance_map,
)
from gradmedic.theory.model import GainPrediction, predicted_gain
from gradmedic.theory.quadrature import bivariate_expectation, gaussian_expectation
from gradmedic.theory.summary import TheorySummary, summarize

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "DepthScales",
    "GainPrediction",
    "Propagation",
    "TheorySummary",
    "bivariate_expectation",
    "chi",
    "chi_at",
    "compose",
    "depth_scale",
    "fixed_point",
    "fixed_point_kind",
    "gaussian_expectation",
    "get_activation",
    "phase",
    "predicted_gain",
    "propagate",
    "sigmoid_chain_bound",
    "summarize",
    "variance_map",
]
