"""The loss curvature an optimizer's step has to respect, and the step it allows.

Gradient descent on a quadratic with top Hessian eigenvalue ``lambda`` is
stable while ``lr * lambda < 2``; a step size past it makes the loss grow along
the top eigenvector. :func:`top_eigenvalue` measures ``lambda`` by power
iteration on Hessian-vector products (double backward, Pearlmutter 1994);
:func:`stability_limit` gives the largest ``lambda`` an optimizer tolerates:

* SGD: ``2 / lr``.
* Heavy-ball momentum ``mu`` (PyTorch's ``buf = mu buf + (1 - d) g``):
  ``2 (1 + mu) / ((1 - d) lr)``.
* Nesterov (PyTorch's ``step = g + mu buf``): the update of one eigen-direction
  has characteristic polynomial ``z^2 - (1 + mu)(1 - h) z + mu (1 - h)`` with
  ``h = lr lambda``; its root crosses ``z = -1`` at ``h = 2 (1 + mu) / (1 + 2 mu)``.
* Adam/AdamW: the preconditioned sharpness, the top eigenvalue of ``P^-1 H``
  with ``P = diag(sqrt(v_hat) + eps) / lr``, against ``(2 + 2 beta1) / (1 - beta1)``
  (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").

Example:
    >>> import torch
    >>> a = torch.tensor([1.0, 3.0, 0.5], requires_grad=True)
    >>> loss = lambda: 0.5 * (torch.tensor([2.0, 8.0, 1.0]) * a**2).sum()
    >>> round(top_eigenvalue(loss, [a]).value, 3)
    8.0
    >>> stability_limit({"type": "SGD", "lr": [0.1], "momentum": [0.0]}).limit
    20.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

LossClosure = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Eigen:
    """The result of a power iteration.

    Attributes:
        value: The top eigenvalue (largest in magnitude) found.
        iterations: Hessian-vector products taken.
        converged: Whether successive estimates agreed to ``tol``.
        vector: The unit eigenvector estimate, one tensor per parameter.
    """

    value: float
    iterations: int
    converged: bool
    vector: list[torch.Tensor]


@dataclass(frozen=True)
class Limit:
    """An optimizer's stability limit on the (possibly preconditioned) sharpness.

    Attributes:
        limit: The largest sharpness the step tolerates (nan: not known).
        rule: The formula, for a person, e.g. ``"2(1+mu)/lr"``.
        kind: ``"sharpness"`` (the Hessian's) or ``"preconditioned"`` (of ``P^-1 H``).
        lr: The learning rate it was derived for.
        lr_coefficient: ``limit * lr``: the safe lr for a sharpness ``s`` is
            ``lr_coefficient / s`` (for ``"sharpness"``).
    """

    limit: float
    rule: str
    kind: str
    lr: float
    lr_coefficient: float


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _normalized(v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    norm = float(_dot(v, v).sqrt())
    if not math.isfinite(norm) or norm == 0.0:
        raise FloatingPointError("the Hessian-vector product is zero or not finite")
    return [x / norm for x in v]


def _gradient_graph(
    loss_fn: LossClosure, params: Sequence[torch.Tensor], iterations: int
) -> tuple[torch.Tensor, ...]:
    """The loss's gradient with its graph kept, for Hessian-vector products on it."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return torch.autograd.grad(loss_fn(), list(params), create_graph=True)


def top_eigenvalue(
    loss_fn: LossClosure,
    params: Sequence[torch.Tensor],
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    start: Sequence[torch.Tensor] | None = None,
    scale: Sequence[torch.Tensor] | None = None,
    shift: float = 0.0,
    seed: int = 0,
) -> Eigen:
    """Top eigenvalue of the loss Hessian (or of ``D^1/2 H D^1/2``) by power iteration.

    One forward and one gradient with ``create_graph=True``, then one Hessian-vector
    product ``d(g . v)/dw`` per iteration on that graph.

    Args:
        loss_fn: Computes the scalar loss from ``params`` (called once).
        params: The tensors the Hessian is taken over (``requires_grad``).
        iterations: Most Hessian-vector products.
        tol: Stop when the estimate moves by less than ``tol`` relative.
        start: A warm-start vector (e.g. the previous eigenvector); random otherwise.
        scale: Per-parameter positive diagonal ``D``: then the eigenvalue is that
            of ``D H`` (same spectrum as ``D^1/2 H D^1/2``), the preconditioned
            sharpness of an adaptive step.
        shift: Iterate on ``H - shift I``: with ``shift`` below the spectrum's
            lowest eigenvalue the iteration finds the top (algebraic) one; the
            value returned has the shift added back.
        seed: Seed of the random start.

    Returns:
        The :class:`Eigen` found. Power iteration finds the eigenvalue largest in
        magnitude; at init of a classifier that is the positive top one.
    """
    params = list(params)
    grads = _gradient_graph(loss_fn, params, iterations)
    root = [s.sqrt() for s in scale] if scale is not None else None
    if start is not None:
        v = _normalized([s.detach().to(p.dtype) for s, p in zip(start, params, strict=True)])
    else:
        gen = torch.Generator().manual_seed(seed)
        v = _normalized(
            [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) for p in params]
        )
    value, previous, k, converged = math.nan, math.nan, 0, False
    for k in range(1, iterations + 1):  # noqa: B007 - k is the count returned
        u = [x * r for x, r in zip(v, root, strict=True)] if root is not None else v
        hv = torch.autograd.grad(grads, params, grad_outputs=u, retain_graph=True)
        if root is not None:
            hv = tuple(h * r for h, r in zip(hv, root, strict=True))
        if shift:
            hv = tuple(h - shift * x for h, x in zip(hv, v, strict=True))
        value = float(_dot(v, hv))
        if not math.isfinite(value):
            break
        v = _normalized([h.detach() for h in hv])
        if math.isfinite(previous) and abs(value - previous) <= tol * abs(value):
            converged = True
            break
        previous = value
    return Eigen(value=value + shift, iterations=k, converged=converged, vector=v)


def sharpness(
    loss_fn: LossClosure,
    params: Sequence[torch.Tensor],
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    start: Sequence[torch.Tensor] | None = None,
    scale: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> Eigen:
    """The top (largest algebraic) eigenvalue of ``H`` (or of ``D^1/2 H D^1/2``) by Lanczos.

    Power iteration finds the eigenvalue largest in *magnitude*, and deep nets
    at init often have a negative one as large as the top; Lanczos
    (with full reorthogonalization) finds the top one in a few tens of
    Hessian-vector products. The step overshoots along the top one.

    Args:
        loss_fn: Computes the scalar loss from ``params`` (called once).
        params: The tensors the Hessian is taken over.
        iterations: Most Lanczos steps (Hessian-vector products); memory is
            ``iterations`` copies of the parameters.
        tol: Stop when the top Ritz value moves by less than ``tol`` relative.
        start: A warm-start vector (e.g. the previous eigenvector); random otherwise.
        scale: A positive diagonal ``D`` per parameter (a preconditioner).
        seed: Seed of the random start.

    Returns:
        The :class:`Eigen`: ``value`` the top Ritz value, ``vector`` its Ritz vector.
    """
    params = list(params)
    grads = _gradient_graph(loss_fn, params, iterations)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    root = torch.cat([s.detach().sqrt().reshape(-1) for s in scale]).double() if scale else None

    def hvp(flat: torch.Tensor) -> torch.Tensor:
        x = flat * root if root is not None else flat
        chunks = zip(x.split(sizes), shapes, params, strict=True)
        parts = [c.reshape(sh).to(p.dtype) for c, sh, p in chunks]
        out = torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True)
        y = torch.cat([o.reshape(-1) for o in out]).double()
        return y * root if root is not None else y

    if start is not None:
        q = torch.cat([s.detach().reshape(-1) for s in start]).double()
    else:
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(sum(sizes), generator=gen, dtype=torch.float64).to(params[0].device)
    q = q / q.norm()
    basis: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    previous, value, converged, top_vec = math.nan, math.nan, False, q
    for k in range(iterations):
        basis.append(q)
        w = hvp(q)
        alpha = float(w @ q)
        alphas.append(alpha)
        for b in basis:  # full reorthogonalization: no ghost eigenvalues
            w = w - (w @ b) * b
        beta = float(w.norm())
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            break
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(tri)
        value = float(evals[-1])
        if math.isfinite(previous) and abs(value - previous) <= tol * max(abs(value), 1e-12):
            converged = True
        if converged or beta <= 1e-12 * max(abs(alpha), 1.0) or k == iterations - 1:
            coeffs = evecs[:, -1].to(q.device)
            top_vec = sum((c * b for c, b in zip(coeffs, basis, strict=True)), torch.zeros_like(q))
            converged = converged or beta <= 1e-12 * max(abs(alpha), 1.0)
            break
        previous = value
        betas.append(beta)
        q = w / beta
    vector = [c.reshape(sh) for c, sh in zip(top_vec.split(sizes), shapes, strict=True)]
    return Eigen(value=value, iterations=len(alphas), converged=converged, vector=vector)


def _first(facts: Mapping[str, Any], key: str, default: Any) -> Any:
    values = facts.get(key)
    if isinstance(values, list | tuple) and values:
        return values[0]
    return default


def stability_limit(facts: Mapping[str, Any]) -> Limit:
    """The stability limit of the optimizer described by ``facts`` (first param group).

    ``facts`` is :func:`gradmedic.optimizer_facts.optimizer_facts`' form:
    ``{"type": "SGD", "lr": [0.01], "momentum": [0.9], ...}``. Optimizers other
    than SGD, Adam and AdamW get ``limit = nan``.
    """
    kind = str(facts.get("type"))
    lr = float(_first(facts, "lr", math.nan))
    if not (math.isfinite(lr) and lr > 0):
        return Limit(math.nan, "lr not positive", "sharpness", lr, math.nan)
    if kind == "SGD":
        mu = float(_first(facts, "momentum", 0.0) or 0.0)
        damp = float(_first(facts, "dampening", 0.0) or 0.0)
        if mu == 0.0:
            return Limit(2.0 / lr, "2/lr", "sharpness", lr, 2.0)
        if bool(_first(facts, "nesterov", False)):
            c = 2.0 * (1.0 + mu) / (1.0 + 2.0 * mu)
            return Limit(c / lr, "2(1+mu)/((1+2mu) lr) (Nesterov)", "sharpness", lr, c)
        c = 2.0 * (1.0 + mu) / (1.0 - damp) if damp < 1.0 else math.inf
        rule = "2(1+mu)/lr (heavy ball)" if damp == 0.0 else "2(1+mu)/((1-dampening) lr)"
        return Limit(c / lr, rule, "sharpness", lr, c)
    if kind in ("Adam", "AdamW"):
        betas = _first(facts, "betas", (0.9, 0.999))
        b1 = float(betas[0])
        c = (2.0 + 2.0 * b1) / (1.0 - b1)
        return Limit(c, "(2+2 beta1)/(1-beta1) on P^-1 H", "preconditioned", lr, c)
    return Limit(math.nan, f"no stability rule for {kind}", "sharpness", lr, math.nan)
