"""Largest singular value and spectral radius of recurrent weight matrices.

Backpropagation through time multiplies the gradient by ``diag(phi'(a_t)) W_hh^T``
at every step, so ``sigma_max(W_hh)`` bounds the per-step gain from above and the
spectral radius ``rho(W_hh)`` sets its asymptotic rate (Pascanu et al. 2013,
"On the difficulty of training recurrent neural networks").

For a gated cell the recurrent weight stacks one block per gate (PyTorch order:
LSTM ``i, f, g, o``; GRU ``r, z, n``). :func:`recurrent_spectra` reports the
*candidate* block (LSTM ``g``, GRU ``n``): the block that plays the role of the
plain RNN's ``W_hh`` in the path ``h_{t-1} -> candidate -> h_t``. For ``nn.RNN``
it is the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

EXACT_MAX = 256
"""Matrices whose smaller side is at most this get exact SVD / eigenvalues."""

GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n")}
CANDIDATE = {"LSTM": "g", "GRU": "n"}


@dataclass
class PowerState:
    """Warm start of the power iteration on ``W^T W`` for one matrix.

    Attributes:
        vector: The last right singular vector estimate (None before the first call).
    """

    vector: torch.Tensor | None = None


def spectral_norm(
    w: torch.Tensor,
    state: PowerState | None = None,
    iters: int = 20,
    exact_max: int = EXACT_MAX,
) -> torch.Tensor:
    """Largest singular value ``sigma_max(W) = sqrt(lambda_max(W^T W))``.

    Exact (``torch.linalg.svdvals``) when ``min(W.shape) <= exact_max``; otherwise
    ``iters`` steps of power iteration ``v <- W^T W v / ||W^T W v||`` started from
    ``state.vector`` (kept between calls, so a slowly changing weight needs few
    steps). The power estimate ``||W v||`` is a lower bound that converges from below.

    Args:
        w: A 2-d matrix.
        state: Warm-start holder, updated in place; None for a cold start.
        iters: Power-iteration steps.
        exact_max: Size up to which the exact SVD is used.

    Returns:
        A 0-d tensor on ``w``'s device (no host synchronisation).

    Example:
        >>> spectral_norm(torch.diag(torch.tensor([3.0, -0.5]))).item()
        3.0
    """
    if w.dim() != 2:
        raise ValueError(f"spectral_norm needs a 2-d matrix, got shape {tuple(w.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    w, all_finite, nan = _finite_part(w)
    if min(w.shape) <= exact_max:
        return torch.where(all_finite, torch.linalg.svdvals(w)[0], nan)
    if state is None:
        state = PowerState()
    v = state.vector
    if v is None or v.shape[0] != w.shape[1] or v.device != w.device or v.dtype != w.dtype:
        v = torch.randn(w.shape[1], dtype=w.dtype, device=w.device, generator=_generator(w))
    for _ in range(iters):
        v = w.T @ (w @ v)
        v = v / v.norm().clamp_min(torch.finfo(w.dtype).tiny)
    state.vector = v
    return torch.where(all_finite, (w @ v).norm(), nan)


def spectral_radius(w: torch.Tensor, exact_max: int = EXACT_MAX) -> torch.Tensor:
    """Spectral radius ``rho(W) = max |lambda_i(W)|`` of a square matrix.

    Exact (``torch.linalg.eigvals``) up to ``exact_max``; above, the largest-modulus
    eigenvalue by ARPACK (``scipy.sparse.linalg.eigs``, implicitly restarted Arnoldi).

    Args:
        w: A square matrix.
        exact_max: Size up to which the dense eigen-decomposition is used.

    Returns:
        A 0-d tensor on ``w``'s device, in ``w``'s dtype.

    Example:
        >>> round(spectral_radius(torch.tensor([[0.0, -2.0], [2.0, 0.0]])).item(), 4)
        2.0
    """
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"spectral_radius needs a square matrix, got shape {tuple(w.shape)}")
    w, all_finite, nan = _finite_part(w)
    if w.shape[0] <= exact_max:
        return torch.where(all_finite, torch.linalg.eigvals(w).abs().max().to(w.dtype), nan)
    from scipy.sparse.linalg import eigs  # lazy: scipy is an optional dependency

    vals = eigs(w.cpu().double().numpy(), k=1, which="LM", return_eigenvectors=False)
    return torch.where(all_finite, torch.tensor(abs(vals[0]), dtype=w.dtype, device=w.device), nan)


def _finite_part(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` with NaN/Inf set to 0, whether it was all finite, and a NaN to report if not.

    SVD and eigen-solvers raise (or crash in MKL) on non-finite input; a diverged
    weight gets NaN as its spectrum instead, decided on the device (no host sync).
    """
    w = _working(w)
    finite = torch.isfinite(w)
    nan = torch.full((), float("nan"), dtype=w.dtype, device=w.device)
    return torch.where(finite, w, 0.0), finite.all(), nan


def _working(w: torch.Tensor) -> torch.Tensor:
    # LAPACK / cuSOLVER have no half-precision kernels
    w = w.detach()
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


def _generator(w: torch.Tensor) -> torch.Generator:
    # A private generator so a cold start does not consume the user's RNG stream.
    gen = torch.Generator(device=w.device)
    gen.manual_seed(0)
    return gen


#: Blocks up to this size get a fresh spectral radius whenever their weights changed
#: (an eigen-decomposition of 128 x 128 takes ~2 ms on CPU, per sampled step).
CHEAP_EIG = 128

#: Warm power-iteration steps per call of :class:`RecurrentSpectra` (after an exact cold start).
WARM_ITERS = 20


@dataclass
class RecurrentSpectra:
    """Spectra of the ``weight_hh`` blocks of one recurrent module, without a host read.

    ``sigma_max`` is fresh on every call: the first call per stream takes an exact
    SVD (which also gives the top right singular vector), later calls take
    ``WARM_ITERS`` power-iteration steps from the last vector, a lower bound that
    converges from below and that a slowly changing weight keeps tight. The spectral
    radius (an eigen-decomposition, the costly part) is recomputed when the block's
    weights changed (their version counters, read on the host) and, for a block larger
    than :data:`CHEAP_EIG`, ``refresh`` calls have passed since it was computed; in
    between the last one stands. Nothing
    is decided from a device value, so the sampled steps make no host read.

    Attributes:
        refresh: Calls between two eigen-decompositions of a changing block (1: every call).
        states: Power-iteration warm starts per stream.
        cache: ``stream -> (versions, calls since computed, rho)``.
    """

    refresh: int = 5
    states: dict[str, PowerState] = field(default_factory=dict)
    cache: dict[str, tuple[tuple[int, ...], int, torch.Tensor]] = field(default_factory=dict)

    def __call__(self, module: nn.RNNBase, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigma_max, rho)`` of the candidate block of ``weight_hh_<stream>``.

        Args:
            module: An ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``.
            stream: Layer/direction suffix as in PyTorch's parameter names,
                e.g. ``"l0"`` or ``"l1_reverse"``.
        """
        block = candidate_block(module, stream)
        state = self.states.setdefault(stream, PowerState())
        if state.vector is None or state.vector.shape[0] != block.shape[1]:
            sigma = _exact_top(block, state)
        else:
            # A pinch of a fixed direction: a vector that a zero block sent to 0 recovers.
            state.vector = state.vector + 1e-3 * _fixed_direction(state.vector)
            sigma = spectral_norm(block, state, iters=WARM_ITERS, exact_max=0)
        versions = _block_versions(module, stream)
        hit = self.cache.get(stream)
        every = 1 if block.shape[0] <= CHEAP_EIG else self.refresh
        if hit is not None and (hit[0] == versions or hit[1] + 1 < every):
            self.cache[stream] = (hit[0], hit[1] + 1, hit[2])
            return sigma, hit[2]
        rho = spectral_radius(block)
        self.cache[stream] = (versions, 0, rho)
        return sigma, rho


def _exact_top(w: torch.Tensor, state: PowerState) -> torch.Tensor:
    """``sigma_max`` by a full SVD, keeping the top right singular vector as the warm start."""
    w, all_finite, nan = _finite_part(w)
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    state.vector = vh[0]
    return torch.where(all_finite, s[0], nan)


def _fixed_direction(like: torch.Tensor) -> torch.Tensor:
    v = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=_generator(like))
    return v / v.norm()


def _block_versions(module: nn.Module, stream: str) -> tuple[int, ...]:
    names = (f"weight_hh_{stream}", f"weight_hr_{stream}")
    return tuple(p._version for n in names if (p := getattr(module, n, None)) is not None)


def candidate_block(module: nn.RNNBase, stream: str = "l0") -> torch.Tensor:
    """The square block of ``weight_hh_<stream>`` feeding the candidate state.

    For ``nn.LSTM(proj_size=P)`` the state is ``h = W_hr (o * tanh(c))``, so the
    square recurrence ``h_{t-1} -> h_t`` through the candidate is ``W_hr W_hg``.

    Args:
        module: An ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``.
        stream: Layer/direction suffix, e.g. ``"l0"`` or ``"l1_reverse"``.
    """
    weight = getattr(module, f"weight_hh_{stream}").detach()
    gates = GATES.get(module.mode)
    if gates is None:  # plain RNN: the whole matrix
        return weight
    block = weight.chunk(len(gates), dim=0)[gates.index(CANDIDATE[module.mode])]
    if getattr(module, "proj_size", 0) > 0:
        block = getattr(module, f"weight_hr_{stream}").detach() @ block
    return block
