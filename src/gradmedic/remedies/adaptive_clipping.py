"""Adaptive gradient clipping: AutoClip, AGC and ZClip.

Each is a small stateful object called after ``loss.backward()`` and before
``optimizer.step()`` as ``clipper(model.parameters())``; it clips the gradients in
place, returns the total L2 norm before clipping, and has ``state_dict()`` /
``load_state_dict()`` for checkpoints. Statistics stay on the gradients' device,
so no call synchronizes with the host.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch

from gradmedic.remedies.clipping import (
    Params,
    _as_list,
    active_monitor,
    notify,
    scale_grads_,
    total_norm,
)
from gradmedic.tensorlists import foreach_norms

__all__ = ["AGC", "AutoClip", "ZClip"]


class _Grads(NamedTuple):
    """One call's gradients: their parameters, per-gradient and global L2 norms."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    norms: list[torch.Tensor]
    total: torch.Tensor
    foreach: bool | None


class _Clipper:
    """The call every adaptive clipper shares: the gradients, their norms, then ``_clip``."""

    def __call__(self, parameters: Params, foreach: bool | None = None) -> torch.Tensor:
        """Clip the gradients of ``parameters`` in place (see the class).

        Args:
            parameters: Tensors whose ``.grad`` is clipped in place.
            foreach: Use the fused ``torch._foreach_*`` kernels (``None``: where supported).

        Returns:
            The total L2 norm before clipping.
        """
        params, grads = _with_grads(parameters)
        if not grads:
            return torch.tensor(0.0)
        with torch.no_grad():
            norms, total = _l2_norms(grads, foreach)
            self._clip(_Grads(params, grads, norms, total, foreach))
        return total

    def _clip(self, g: _Grads) -> None:
        raise NotImplementedError


class _GlobalNormClipper(_Clipper):
    """A clipper of the global L2 norm at a threshold it adapts (AutoClip, ZClip).

    Subclasses set ``kind`` (the record's ``clip.kind``) and define ``_clip_at(total)
    -> (threshold, clipped, scale)``, updating their own statistics.
    """

    kind: ClassVar[str]

    def _clip(self, g: _Grads) -> None:
        threshold, clipped, scale = self._clip_at(g.total)
        scale_grads_(g.grads, scale.to(g.total.dtype), g.foreach)
        _note(g.params, g.grads, g.norms, self.kind, threshold, g.total, clipped, scale)

    def _clip_at(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class AutoClip(_GlobalNormClipper):
    """Clip the global norm at a percentile of all gradient norms seen so far.

    Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks": at step t with norms ``n_1..n_t`` (the current one
    included), ``threshold = percentile_p(n_1..n_t)`` (linear interpolation, as
    ``numpy.percentile``) and ``g <- g * min(threshold / (||g|| + 1e-6), 1)``.

    Args:
        percentile: ``p`` in [0, 100]; the paper recommends 10.
        history_size: Keep only the last this many norms (``None``: all, as in the
            paper; memory then grows by one float per step).

    Example:
        >>> import torch, gradmedic
        >>> model = torch.nn.Linear(3, 1)
        >>> clipper = gradmedic.AutoClip(percentile=10)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> norm = clipper(model.parameters())
        >>> clipper.steps
        1
    """

    kind = "autoclip"

    def __init__(self, percentile: float = 10.0, history_size: int | None = None) -> None:
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        if history_size is not None and int(history_size) < 1:
            raise ValueError(f"history_size must be None or a positive integer, got {history_size}")
        self.percentile = float(percentile)
        self.history_size = None if history_size is None else int(history_size)
        self.steps = 0
        self.threshold: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None

    def _clip_at(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record the current norm, then clip at the percentile of the history."""
        self._push(total)
        threshold = torch.quantile(self.history(), self.percentile / 100.0)
        self.threshold = threshold
        return threshold, total > threshold, torch.clamp(threshold / (total + 1e-6), max=1.0)

    def history(self) -> torch.Tensor:
        """The stored norms, oldest first (NaN recorded as +inf)."""
        if self._buffer is None:
            return torch.empty(0, dtype=torch.float64)
        n = min(self.steps, self._buffer.numel())
        if self.history_size is None or self.steps <= self.history_size:
            return self._buffer[:n]
        pos = self.steps % self.history_size
        return torch.cat([self._buffer[pos:], self._buffer[:pos]])

    def _push(self, total: torch.Tensor) -> None:
        value = torch.where(torch.isnan(total), float("inf"), total).to(torch.float64)
        buf = self._buffer
        if buf is None:
            buf = torch.zeros(self.history_size or 64, dtype=torch.float64, device=value.device)
        elif buf.device != value.device:
            buf = buf.to(value.device)
        if self.history_size is None and self.steps >= buf.numel():
            buf = torch.cat([buf, torch.zeros_like(buf)])  # doubling: amortized O(1)
        buf[self.steps % buf.numel()] = value
        self._buffer = buf
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Settings and the norm history (oldest first), for checkpoints."""
        return {
            "percentile": self.percentile,
            "history_size": self.history_size,
            "steps": self.steps,
            "history": self.history().detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.percentile = float(state["percentile"])
        self.history_size = state["history_size"]
        history = torch.as_tensor(state["history"], dtype=torch.float64).flatten()
        self.steps = int(state["steps"])
        if history.numel() == 0:
            self._buffer = None
        elif self.history_size is None:
            self._buffer = torch.cat([history, torch.zeros_like(history)])
        else:
            buf = torch.zeros(self.history_size, dtype=torch.float64)
            buf[: history.numel()] = history[-self.history_size :]
            # In a full ring the oldest entry sits at slot steps % history_size.
            full = self.steps > self.history_size
            self._buffer = torch.roll(buf, self.steps % self.history_size) if full else buf


class AGC(_Clipper):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets).

    For each output unit ``i`` of a weight (row ``i`` along dim 0, all other dims
    together), with ``max_i = clipping * max(||W_i||, eps)``:
    ``G_i <- G_i * max_i / ||G_i||`` when ``||G_i|| > max_i``. Parameters with
    one dimension or none (biases, gains) are treated as one unit, as in the
    official JAX code's ``unitwise_norm`` and timm. The paper does not clip the
    final classifier layer: pass only the parameters you want clipped.

    Args:
        clipping: The ratio ``lambda`` of gradient to weight norm allowed (paper: 0.01
            to 0.16, smaller for larger batches).
        eps: Floor on the weight norm, so zero-initialized weights can still move.

    Example:
        >>> import torch, gradmedic
        >>> layer = torch.nn.Linear(4, 2)
        >>> layer(torch.randn(8, 4)).sum().backward()
        >>> norm = gradmedic.AGC(clipping=0.01)(layer.parameters())
        >>> bool(layer.weight.grad.norm(dim=1).le(0.01 * layer.weight.norm(dim=1) + 1e-6).all())
        True
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3) -> None:
        if float(clipping) <= 0:
            raise ValueError(f"clipping must be positive, got {clipping}")
        if float(eps) < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        self.clipping = float(clipping)
        self.eps = float(eps)

    def _clip(self, g: _Grads) -> None:
        """Clip each unit's gradient relative to its weight norm."""
        after: list[torch.Tensor] = []
        clipped: list[torch.Tensor] = []
        for p, grad, g_norm in zip(g.params, g.grads, g.norms, strict=True):
            if grad.ndim <= 1:
                w_norm = torch.linalg.vector_norm(p, dtype=g_norm.dtype)
            else:
                w_norm = torch.linalg.vector_norm(p.flatten(1), dim=1, dtype=g_norm.dtype)
                g_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=g_norm.dtype)
            max_norm = self.clipping * w_norm.clamp(min=self.eps)
            over = g_norm > max_norm
            factor = torch.where(over, max_norm / g_norm.clamp(min=1e-6), 1.0)
            shape = (-1, *([1] * (grad.ndim - 1)))
            grad.mul_(factor.to(grad.dtype).reshape(shape) if grad.ndim else factor)
            after.append(torch.linalg.vector_norm(g_norm * factor))
            clipped.append(over.any())
        clipped_any = torch.stack(clipped).any()
        scale = total_norm(after, 2.0, g.total.device) / g.total.clamp(min=1e-30)
        _note(g.params, g.grads, None, "agc", self.clipping, g.total, clipped_any, scale)

    def state_dict(self) -> dict[str, Any]:
        """The settings (AGC keeps no running state)."""
        return {"clipping": self.clipping, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.clipping = float(state["clipping"])
        self.eps = float(state["eps"])


_ZCLIP_MODES = ("reciprocal", "zscore", "mean")


class ZClip(_GlobalNormClipper):
    r"""Clip gradient-norm spikes detected by a z-score against EMA statistics.

    Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training".
    The first ``warmup_steps`` norms only initialise ``mu`` (their mean) and
    ``sigma^2`` (their population variance). Then for each norm ``g``:
    ``z = (g - mu) / (sigma + eps)``; if ``z > z_thresh`` the norm is clipped to

    - ``"reciprocal"`` (default, the reference code's ``adaptive_scaling``):
      :math:`\mu + \frac{z_{thresh}^2}{z}\sigma` (equals the next one at the boundary
      and pulls harder on larger spikes),
    - ``"zscore"``: :math:`\mu + z_{thresh}\,\sigma`,
    - ``"mean"``: :math:`\mu`;

    and the EMA is updated with the clipped norm ``x``: ``mu <- a mu + (1-a) x``, then
    ``sigma^2 <- a sigma^2 + (1-a) (x - mu)^2`` with the new ``mu``. A non-finite norm
    leaves the statistics unchanged.

    Args:
        alpha: EMA smoothing factor ``a``.
        z_thresh: z-score above which a norm counts as a spike.
        warmup_steps: Norms collected before clipping starts (at least 1).
        clip_mode: ``"reciprocal"``, ``"zscore"`` or ``"mean"`` (see above).
        max_norm: Optional hard cap on the norm, applied at every step, warmup included.
        eps: Added to ``sigma`` in the z-score.

    Example:
        >>> import torch, gradmedic
        >>> model = torch.nn.Linear(3, 1)
        >>> clipper = gradmedic.ZClip(warmup_steps=2)
        >>> for _ in range(3):
        ...     model.zero_grad()
        ...     model(torch.randn(8, 3)).pow(2).mean().backward()
        ...     norm = clipper(model.parameters())
        >>> clipper.initialized
        True
    """

    kind = "zclip"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        clip_mode: str = "reciprocal",
        max_norm: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if float(z_thresh) <= 0:
            raise ValueError(f"z_thresh must be positive, got {z_thresh}")
        if int(warmup_steps) < 1:
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        if clip_mode not in _ZCLIP_MODES:
            raise ValueError(f"clip_mode must be one of {_ZCLIP_MODES}, got {clip_mode!r}")
        self.alpha = float(alpha)
        self.z_thresh = float(z_thresh)
        self.warmup_steps = int(warmup_steps)
        self.clip_mode = clip_mode
        self.max_norm = None if max_norm is None else float(max_norm)
        self.eps = float(eps)
        self.steps = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self._warmup: list[torch.Tensor] = []

    @property
    def initialized(self) -> bool:
        """Whether warmup is over and spikes are being clipped."""
        return self.mean is not None

    def _clip_at(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Update the statistics and clip the gradients if their norm is a spike."""
        if self.mean is None:
            target = total
            self._warmup.append(total.detach().clone())
            if len(self._warmup) >= self.warmup_steps:
                history = torch.stack(self._warmup)
                self.mean = history.mean()
                self.var = history.var(correction=0)
                self._warmup = []
        else:
            target = self._update(total)
        if self.max_norm is not None:
            target = target.clamp(max=self.max_norm)
        self.steps += 1
        over = total > target
        return target, over, torch.where(over, target / (total + 1e-6), 1.0)

    def _update(self, g: torch.Tensor) -> torch.Tensor:
        mean, var = self.mean.to(g.device), self.var.to(g.device)  # type: ignore[union-attr]
        std = var.sqrt()
        z = (g - mean) / (std + self.eps)
        if self.clip_mode == "reciprocal":
            bound = mean + self.z_thresh**2 / z * std
        elif self.clip_mode == "zscore":
            bound = mean + self.z_thresh * std
        else:
            bound = mean
        spike = z > self.z_thresh
        x = torch.where(spike, bound, g)
        finite = torch.isfinite(g)
        new_mean = self.alpha * mean + (1 - self.alpha) * x
        new_var = self.alpha * var + (1 - self.alpha) * (x - new_mean) ** 2
        self.mean = torch.where(finite, new_mean, mean)
        self.var = torch.where(finite, new_var, var)
        return torch.where(spike, bound, g)

    def state_dict(self) -> dict[str, Any]:
        """Settings and running statistics, for checkpoints."""
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "clip_mode": self.clip_mode,
            "max_norm": self.max_norm,
            "eps": self.eps,
            "steps": self.steps,
            "mean": None if self.mean is None else self.mean.detach().cpu().clone(),
            "var": None if self.var is None else self.var.detach().cpu().clone(),
            "warmup": [t.detach().cpu().clone() for t in self._warmup],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.__init__(  # type: ignore[misc]
            state["alpha"],
            state["z_thresh"],
            state["warmup_steps"],
            state["clip_mode"],
            state["max_norm"],
            state["eps"],
        )
        self.steps = int(state["steps"])
        self.mean = None if state["mean"] is None else torch.as_tensor(state["mean"])
        self.var = None if state["var"] is None else torch.as_tensor(state["var"])
        self._warmup = [torch.as_tensor(t) for t in state["warmup"]]


def _l2_norms(
    grads: list[torch.Tensor], foreach: bool | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-gradient L2 norms (half precision upcast) and their global norm."""
    norms = foreach_norms(grads, 2.0, foreach, upcast=True)
    return norms, total_norm(norms, 2.0, grads[0].device)


def _with_grads(parameters: Params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    pairs = [(p, p.grad) for p in _as_list(parameters) if p.grad is not None]
    return [p for p, _ in pairs], [g for _, g in pairs]


def _note(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    norms: list[torch.Tensor] | None,
    kind: str,
    threshold: float | torch.Tensor,
    total: torch.Tensor,
    clipped: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    monitor = active_monitor(params)
    if monitor is not None:
        info = {
            "kind": kind,
            "threshold": threshold,
            "total_norm": total,
            "clipped": clipped,
            "scale": scale,
        }
        notify(monitor, grads, norms, info)
