"""Spectral norm / radius against NumPy's dense linear algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradmedic.probes.spectra import (
    PowerState,
    RecurrentSpectra,
    candidate_block,
    spectral_norm,
    spectral_radius,
)


def test_exact_path_matches_numpy():
    w = torch.randn(40, 40, dtype=torch.float64)
    assert spectral_norm(w).item() == pytest.approx(np.linalg.norm(w.numpy(), 2), rel=1e-12)
    rho = max(abs(np.linalg.eigvals(w.numpy())))
    assert spectral_radius(w).item() == pytest.approx(rho, rel=1e-10)


def test_power_iteration_converges_and_warm_start_helps():
    # exact_max=8 forces the power iteration; a known spectrum with a clear gap
    n = 60
    q1, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    s[-1] = 3.0
    w = q1 @ torch.diag(s) @ q2.T
    state = PowerState()
    cold = spectral_norm(w, state, iters=30, exact_max=8).item()
    assert cold == pytest.approx(3.0, rel=1e-6)
    # a slightly changed matrix: 2 warm steps are enough, 2 cold steps are not
    w2 = w + 1e-3 * torch.randn(n, n, dtype=torch.float64) / n**0.5
    exact = np.linalg.norm(w2.numpy(), 2)
    warm = spectral_norm(w2, state, iters=2, exact_max=8).item()
    fresh = spectral_norm(w2, PowerState(), iters=2, exact_max=8).item()
    assert warm == pytest.approx(exact, rel=1e-6)
    assert abs(fresh - exact) > 10 * abs(warm - exact)
    assert warm <= exact * (1 + 1e-12)  # a lower bound


def test_large_spectral_radius_uses_arpack():
    w = torch.randn(40, 40, dtype=torch.float64) / 40**0.5
    rho = max(abs(np.linalg.eigvals(w.numpy())))
    assert spectral_radius(w, exact_max=8).item() == pytest.approx(rho, rel=1e-8)


def test_non_normal_matrix_radius_differs_from_norm():
    w = torch.tensor([[0.5, 10.0], [0.0, 0.5]])
    assert spectral_norm(w).item() > 10
    assert spectral_radius(w).item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("module", "rows"),
    [(nn.RNN(3, 4), slice(0, 4)), (nn.LSTM(3, 4), slice(8, 12)), (nn.GRU(3, 4), slice(8, 12))],
)
def test_candidate_block_is_the_documented_gate(module, rows):
    torch.testing.assert_close(candidate_block(module), module.weight_hh_l0.detach()[rows])


def test_candidate_block_with_projection():
    m = nn.LSTM(3, 5, proj_size=2, bidirectional=True)
    block = candidate_block(m, "l0_reverse")
    want = m.weight_hr_l0_reverse.detach() @ m.weight_hh_l0_reverse.detach()[10:15]
    torch.testing.assert_close(block, want)
    assert block.shape == (2, 2)


def test_recurrent_spectra_sigma_is_fresh_and_rho_refreshes_on_schedule():
    torch.manual_seed(0)
    m = nn.RNN(3, 160)  # above CHEAP_EIG: the costly decomposition waits for its turn
    spectra = RecurrentSpectra(refresh=3)
    sigma0, rho0 = spectra(m, "l0")
    w = m.weight_hh_l0.detach().numpy()
    assert sigma0.item() == pytest.approx(np.linalg.norm(w, 2), rel=1e-5)
    assert rho0.item() == pytest.approx(max(abs(np.linalg.eigvals(w))), rel=1e-5)
    assert spectra(m, "l0")[1] is rho0  # unchanged weights: the decomposition stands
    with torch.no_grad():  # the weights change: sigma follows at once, rho on schedule
        m.weight_hh_l0.add_(0.005 * torch.randn(160, 160))
    sigma, rho = spectra(m, "l0")
    w = m.weight_hh_l0.detach().numpy()
    assert sigma.item() == pytest.approx(np.linalg.norm(w, 2), rel=1e-3)
    assert rho is rho0  # two calls since the decomposition: refresh=3 not reached
    sigma, rho3 = spectra(m, "l0")  # the third: recomputed
    assert sigma.item() == pytest.approx(np.linalg.norm(w, 2), rel=1e-5)
    assert rho3.item() == pytest.approx(max(abs(np.linalg.eigvals(w))), rel=1e-5)


def test_a_small_blocks_rho_follows_every_change():
    # a stale radius beside a fresh sigma_max read 3.0 beside 7e7 after one blown-up step
    torch.manual_seed(0)
    m = nn.RNN(3, 16)
    spectra = RecurrentSpectra(refresh=5)
    spectra(m, "l0")
    with torch.no_grad():
        m.weight_hh_l0.mul_(1e3)
    sigma, rho = spectra(m, "l0")
    w = m.weight_hh_l0.detach().numpy()
    assert rho.item() == pytest.approx(max(abs(np.linalg.eigvals(w))), rel=1e-5)
    assert rho.item() <= sigma.item() * (1 + 1e-5)


def test_recurrent_spectra_recover_from_a_zero_block():
    m = nn.RNN(3, 8)
    spectra = RecurrentSpectra(refresh=1)
    with torch.no_grad():
        m.weight_hh_l0.zero_()
    assert spectra(m, "l0")[0].item() == 0.0
    with torch.no_grad():
        m.weight_hh_l0.copy_(torch.diag(torch.arange(1.0, 9.0)))
    for _ in range(3):  # warm steps from the zero vector's neighbourhood
        sigma, rho = spectra(m, "l0")
    assert sigma.item() == pytest.approx(8.0, rel=1e-3)
    assert rho.item() == pytest.approx(8.0, rel=1e-5)


@pytest.mark.parametrize(
    ("fn", "arg", "match"),
    [
        (spectral_norm, torch.randn(3), "2-d"),
        (spectral_radius, torch.randn(3, 4), "square"),
    ],
)
def test_bad_shapes(fn, arg, match):
    with pytest.raises(ValueError, match=match):
        fn(arg)
