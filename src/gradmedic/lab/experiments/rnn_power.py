"""K5: backprop through time as repeated multiplication by W_h (source 002's experiment).

Source 002 is study notes on a textbook's RNN chapter (see gradmedic.lab.claims.SOURCES).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradmedic.lab import plotting
from gradmedic.lab.base import LabConfig, Result, experiment, judge_claims

N, H, T = 2, 3, 20
BOOK_SEED = 3  # the seed of the book's listing that source 002 follows


def dh_norms(w_h: np.ndarray, steps: int = T, n: int = N) -> list[float]:
    """The book's loop: ``dh = ones((N, H))``; ``dh = dh @ W_h.T``; ``sqrt(sum(dh^2)) / N``."""
    dh = np.ones((n, w_h.shape[0]))
    norms = []
    for _ in range(steps):
        dh = dh @ w_h.T
        norms.append(float(np.sqrt(np.sum(dh**2)) / n))
    return norms


def rates(w_h: np.ndarray) -> tuple[float, float]:
    """``(largest singular value, spectral radius)`` of ``w_h``."""
    return float(np.linalg.norm(w_h, 2)), float(np.max(np.abs(np.linalg.eigvals(w_h))))


def late_rate(norms: list[float], window: int = 10) -> float:
    """Measured per-step growth factor over the last ``window`` steps."""
    return float((norms[-1] / norms[-1 - window]) ** (1 / window))


@experiment(
    "rnn_power", ["K5"], "Recurrent gradients: ||dh W_h^t|| against singular value and radius"
)
def run(config: LabConfig) -> Result:
    rng = np.random.RandomState(BOOK_SEED + config.seed)
    w_big = rng.randn(H, H)
    cases = {"randn": w_big, "randn_times_half": w_big * 0.5}
    legend = {"randn": "randn(3, 3)", "randn_times_half": "randn(3, 3) * 0.5"}
    ref: dict[str, dict[str, Any]] = {}
    for name, w in cases.items():
        series = dh_norms(w)
        s_max, rho = rates(w)
        ref[name] = {
            "norms": series,
            "sigma_max": s_max,
            "spectral_radius": rho,
            "grows": series[-1] > series[0],
            "late_rate": late_rate(series),
        }

    # Which quantity predicts growth vs decay? Random 3x3 matrices over a range of scales.
    n_mat = config.pick(400, 4000)
    steps = 100  # long enough for the asymptotic rate (the spectral radius) to dominate
    w = rng.randn(n_mat, H, H) * np.exp(rng.uniform(np.log(0.2), np.log(2.0), (n_mat, 1, 1)))
    dh = np.ones((n_mat, N, H))
    norms = np.empty((n_mat, steps))
    for step in range(steps):  # the book's loop, for all matrices at once
        dh = dh @ np.swapaxes(w, 1, 2)
        norms[:, step] = np.sqrt(np.sum(dh**2, axis=(1, 2))) / N
    s_maxes = np.linalg.norm(w, 2, axis=(1, 2))
    rhos = np.max(np.abs(np.linalg.eigvals(w)), axis=1)
    grew = norms[:, -1] > norms[:, 0]
    measured = (norms[:, -1] / norms[:, -51]) ** (1 / 50)
    by_sigma = float(np.mean((s_maxes > 1) == grew))
    by_rho = float(np.mean((rhos > 1) == grew))
    below_one_decays = bool(np.all(~grew[s_maxes < 1]))
    above_one_but_decays = float(np.mean(~grew[s_maxes > 1]))
    rho_error = float(np.median(np.abs(measured / rhos - 1)))
    sigma_error = float(np.median(np.abs(measured / s_maxes - 1)))

    checks = {
        "K5": {
            "dh grows with W_h = randn(3, 3)": ref["randn"]["grows"],
            "dh decays with W_h = randn(3, 3) * 0.5": not ref["randn_times_half"]["grows"],
            "largest singular value < 1 always gives decay": below_one_decays,
            "largest singular value > 1 vs < 1 predicts growth vs decay in >= 95% of matrices": (
                by_sigma >= 0.95
            ),
        }
    }
    verdict, per_claim = judge_claims(checks)

    fig, axes = plotting.figure(2, width=4.8)
    ax = axes[0]
    t = np.arange(1, T + 1)
    for k, (name, r) in enumerate(ref.items()):
        plotting.profile(ax, t, r["norms"], label=f"W_h = {legend[name]}", color=f"C{k}")
        plotting.profile(
            ax,
            t,
            r["norms"][0] * r["sigma_max"] ** (t - 1),
            label=f"sigma_max^t ({r['sigma_max']:.2f})",
            predicted=True,
            color=f"C{k}",
        )
        ax.plot(
            t,
            r["norms"][0] * r["spectral_radius"] ** (t - 1),
            ":",
            color=f"C{k}",
            label=f"rho^t ({r['spectral_radius']:.2f})",
        )
    plotting.label(ax, "||dh|| over backprop steps (N=2, H=3)", "step t", "||dh|| / N")
    ax = axes[1]
    shown = slice(0, 300)  # enough points to see the pattern, a small SVG
    lim = [0, float(max(s_maxes[shown].max(), measured[shown].max()))]
    ax.plot(lim, lim, "k:", linewidth=1, label="rate = predictor")
    styles: list[dict[str, Any]] = [{"s": 5, "alpha": 0.5}, {"s": 9, "alpha": 0.8, "marker": "x"}]
    for k, (predictor, name) in enumerate(
        ((s_maxes, "largest singular value"), (rhos, "spectral radius"))
    ):
        ax.scatter(
            predictor[shown], measured[shown], color=f"C{k}", label=f"vs {name}", **styles[k]
        )
    plotting.label(ax, f"measured rate per step, {n_mat} random W_h", "predictor", "measured rate")

    return Result(
        name="rnn_power",
        claims=["K5"],
        title="Recurrent gradients: ||dh W_h^t|| against singular value and radius",
        setup=(
            "The experiment of the textbook that source 002 ('The problems of RNNs; LSTM') "
            f"follows: N={N}, H={H}, T={T}, dh = ones((N, H)), "
            f"W_h = randn(H, H) (NumPy RandomState({BOOK_SEED + config.seed})) and the same matrix "
            "* 0.5; at each step dh = dh W_h^T and the norm sqrt(sum dh^2) / N is recorded. Then "
            f"{n_mat} random 3x3 matrices randn * s, s log-uniform in [0.2, 2], {steps} "
            "steps each, to see whether the largest singular value or the spectral radius "
            "predicts growth."
        ),
        expected=(
            "The norm grows exponentially when the largest singular value of W_h is above 1 and "
            "decays when it is below 1."
        ),
        numbers={
            "reference": ref,
            "random_matrices": n_mat,
            "steps": steps,
            "accuracy_sigma_max_rule": by_sigma,
            "accuracy_spectral_radius_rule": by_rho,
            "sigma_max_below_1_always_decays": below_one_decays,
            "share_sigma_max_above_1_that_decay": above_one_but_decays,
            "median_rel_error_rate_vs_spectral_radius": rho_error,
            "median_rel_error_rate_vs_sigma_max": sigma_error,
            "checks": checks,
        },
        rule=(
            "Growth means ||dh_T|| > ||dh_1||. The claim holds if the two reference matrices "
            "grow and decay as claimed, every random matrix with largest singular value < 1 "
            "decays, and the rule 'largest singular value > 1 -> grows' is right for >= 95% of "
            "the random matrices; some of these: holds partly; none: does not hold."
        ),
        verdict=verdict,
        per_claim=per_claim,
        explanation=(
            f"randn: sigma_max {ref['randn']['sigma_max']:.2f}, spectral radius "
            f"{ref['randn']['spectral_radius']:.2f}, late rate per step "
            f"{ref['randn']['late_rate']:.2f}; randn * 0.5: sigma_max "
            f"{ref['randn_times_half']['sigma_max']:.2f}, radius "
            f"{ref['randn_times_half']['spectral_radius']:.2f}, rate "
            f"{ref['randn_times_half']['late_rate']:.2f}. The largest singular value is an upper "
            "bound on the growth per step (||dh W|| <= sigma_max ||dh||), so sigma_max < 1 "
            "guarantees decay; but the long-run rate is the spectral radius (Gelfand's formula), "
            f"and {above_one_but_decays:.0%} of the random matrices with sigma_max > 1 still "
            f"decay. Growth is predicted correctly by sigma_max > 1 for {by_sigma:.1%} and by "
            f"spectral radius > 1 for {by_rho:.1%} of them; the late per-step rate differs from "
            f"the spectral radius by {rho_error:.1e} (median, relative) and from sigma_max by "
            f"{sigma_error:.1%}."
            + (
                " The book's own shrinking case has sigma_max "
                f"{ref['randn_times_half']['sigma_max']:.2f} > 1 and still decays."
                if ref["randn_times_half"]["sigma_max"] > 1 and not ref["randn_times_half"]["grows"]
                else ""
            )
        ),
        figures={"bptt": fig},
    )
