"""Pascanu et al. 2013's result: the exploding-gradient cliff of a one-unit RNN, norm clipping."""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch

from gradmedic.lab import plotting
from gradmedic.lab.base import LabConfig, Result, experiment, judge_claims
from gradmedic.lab.claims import PAPERS

NAME = "paper_pascanu2013"
PAPER = PAPERS["pascanu2013"]
TITLE = "Pascanu et al. 2013: the cliff of a one-unit RNN, with and without norm clipping"
T = 50
X0 = 0.5
TARGET = 0.7
LR = 0.1
W_RANGE = (4.0, 8.0)  # bistable region of x -> w sigmoid(x) + b needs w > 4
B_RANGE = (-5.0, 0.0)
FAR = 10.0  # a single step longer than this has left the region it started in
TRAINED = 1e-2  # loss below which a run counts as fitted


def loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(x_T - target)^2`` for ``x_t = w sigmoid(x_(t-1)) + b``, ``x_0 = 0.5``, elementwise."""
    x = torch.full_like(w, X0)
    for _ in range(T):
        x = w * torch.sigmoid(x) + b
    return (x - TARGET) ** 2


def descend(start: torch.Tensor, steps: int, threshold: float | None) -> dict:
    """Gradient descent from each row ``(w, b)`` of ``start`` at once; norm clipping if given."""
    p = start.clone().double().requires_grad_(True)
    path, losses, norms = [p.detach().clone()], [], []
    for _ in range(steps):
        value = loss(p[:, 0], p[:, 1])
        (g,) = torch.autograd.grad(value.sum(), p)  # rows are independent: per-run gradients
        n = torch.linalg.vector_norm(g, dim=1)
        if threshold is not None:
            g = g * torch.clamp(threshold / (n + 1e-6), max=1.0)[:, None]
        with torch.no_grad():
            p -= LR * g
        losses.append(value.detach())
        norms.append(n)
        path.append(p.detach().clone())
    trace = torch.stack(path)  # (steps + 1, runs, 2)
    jumps = torch.linalg.vector_norm(trace[1:] - trace[:-1], dim=2)  # (steps, runs)
    loss_t = torch.stack(losses)
    final = loss(trace[-1, :, 0], trace[-1, :, 1])
    return {
        "path": trace.numpy(),
        "loss": loss_t.numpy(),
        "grad_norm": torch.stack(norms).numpy(),
        "largest_step": jumps.max(dim=0).values.numpy(),
        "final_loss": final.numpy(),
    }


@experiment(NAME, ["R7", "K5"], TITLE)
def run(config: LabConfig) -> Result:
    n_starts = config.pick(300, 1000)  # a run meets the thin cliff wall rarely (~1%)
    steps = config.pick(60, 100)
    gen = torch.Generator().manual_seed(config.seed)
    lo = torch.tensor([W_RANGE[0], B_RANGE[0]], dtype=torch.float64)
    hi = torch.tensor([W_RANGE[1], B_RANGE[1]], dtype=torch.float64)
    starts = lo + (hi - lo) * torch.rand(n_starts, 2, generator=gen, dtype=torch.float64)
    sw = starts.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(loss(sw[:, 0], sw[:, 1]).sum(), sw)
    typical = float(torch.linalg.vector_norm(g0, dim=1).median())
    threshold = 2 * typical
    plain = descend(starts, steps, None)
    clipped = descend(starts, steps, threshold)
    gmax = float(plain["grad_norm"].max())
    gmed = float(np.median(plain["grad_norm"]))
    far_plain = int((plain["largest_step"] > FAR).sum())
    far_clipped = int((clipped["largest_step"] > FAR).sum())
    fitted_clipped = int((clipped["final_loss"] < TRAINED).sum())
    checks = {
        "K5": {
            "the cliff: the largest gradient met is >= 30x the typical one at the start points": (
                gmax >= 30 * typical
            ),
        },
        "R7": {
            f"without clipping some step throws the parameters farther than {FAR:g}": (
                far_plain > 0
            ),
            f"with norm clipping at {threshold:.3g} no step goes farther than {FAR:g}": (
                far_clipped == 0
            ),
            f"with clipping at least 90% of the runs fit (final loss < {TRAINED:g})": (
                fitted_clipped >= 0.9 * n_starts
            ),
        },
    }
    verdict, per_claim = judge_claims(checks)

    fig, (ax_s, ax_j) = plotting.figure(2, width=4.4)
    worst = int(np.argmax(plain["largest_step"]))
    both = np.concatenate([plain["path"][:, worst], clipped["path"][:, worst]])
    both = both[np.isfinite(both).all(axis=1)]
    lo_w, lo_b = np.maximum(both.min(axis=0), -40.0) - 1.0
    hi_w, hi_b = np.minimum(both.max(axis=0), 40.0) + 1.0
    ws = torch.linspace(float(lo_w), float(hi_w), 241, dtype=torch.float64)
    bs = torch.linspace(float(lo_b), float(hi_b), 201, dtype=torch.float64)
    gw, gb = torch.meshgrid(ws, bs, indexing="ij")
    with torch.no_grad():
        surface = torch.log10(loss(gw, gb) + 1e-12).numpy()
    mesh = ax_s.pcolormesh(ws.numpy(), bs.numpy(), surface.T, cmap="Greys_r", shading="auto",
                           vmin=-4, vmax=float(surface.max()), rasterized=True)  # fmt: skip
    fig.colorbar(mesh, ax=ax_s, label="log10 loss (below -4 black)")
    for run_, name, color in ((plain, "no clipping", "C3"), (clipped, "norm clipping", "C0")):
        path = run_["path"][:, worst]
        ax_s.plot(path[:, 0], path[:, 1], ".-", color=color, markersize=3, linewidth=1,
                  label=f"{name} (start {worst})")  # fmt: skip
    ax_s.plot(*plain["path"][0, worst], "o", color="yellow", markersize=5, label="start")
    ax_s.set_xlim(float(lo_w), float(hi_w))
    ax_s.set_ylim(float(lo_b), float(hi_b))
    ax_s.grid(False)
    plotting.label(ax_s, "loss surface and the run thrown farthest", "w", "b")
    rank = np.arange(1, n_starts + 1)
    for run_, name, color in ((plain, "no clipping", "C3"), (clipped, "norm clipping", "C0")):
        ax_j.plot(rank, np.sort(run_["largest_step"])[::-1], "o", color=color, markersize=2,
                  label=name)  # fmt: skip
    ax_j.set_xscale("log")
    ax_j.axhline(FAR, color="0.4", linestyle=":", label=f"{FAR:g}: left the region")
    ax_j.set_yscale("log")
    plotting.label(
        ax_j, "largest single step of each run", "runs ranked by that step", "||delta theta||"
    )

    return Result(
        setup=(
            f"{PAPER.cite}, section 3 and Figure 6: a one-unit recurrent net x_t = w "
            f"sigmoid(x_(t-1)) + b, x_0 = {X0}, T = {T} steps, loss (x_T - {TARGET})^2, float64. "
            f"{n_starts} start points (w, b) uniform in {list(W_RANGE)} x {list(B_RANGE)} (seed "
            f"{config.seed}); plain gradient descent, lr {LR}, {steps} steps, without clipping "
            f"and with clipping of the gradient norm at {threshold:.3g} (twice the median "
            "gradient norm at the start points, as the paper suggests a threshold near the "
            "typical norm), same starts."
        ),
        expected=(
            "Where the map x -> w sigmoid(x) + b changes from one attractor to two, x_T jumps "
            "and the loss surface has a cliff: the gradient there is huge, and one plain step "
            "throws the parameters far away. Clipping the norm keeps that step bounded and "
            "descent continues."
        ),
        numbers={
            "n_starts": n_starts,
            "steps": steps,
            "threshold": threshold,
            "typical_grad_norm_at_start": typical,
            "largest_grad_norm": gmax,
            "median_grad_norm": gmed,
            "runs_with_step_beyond_far": {"plain": far_plain, "clipped": far_clipped},
            "runs_fitted": {
                "plain": int((plain["final_loss"] < TRAINED).sum()),
                "clipped": fitted_clipped,
            },
            "largest_step": {
                "plain": plain["largest_step"].tolist(),
                "clipped": clipped["largest_step"].tolist(),
            },
            "final_loss": {
                "plain": plain["final_loss"].tolist(),
                "clipped": clipped["final_loss"].tolist(),
            },
            "checks": checks,
        },
        rule=(
            "Fixed before the run: the threshold (twice the median starting gradient norm), "
            f"'far' ({FAR:g} in parameter space, the size of the start region) and 'fitted' "
            f"(loss < {TRAINED:g}). Each claim holds if all its checks pass, partly if some do, "
            "does not hold if none do."
        ),
        verdict=verdict,
        per_claim=per_claim,
        explanation=(
            f"Largest gradient norm met {gmax:.3g}; typical at the start {typical:.3g}, median "
            f"over all steps {gmed:.3g}. Without "
            f"clipping {far_plain} of {n_starts} runs made a step longer than {FAR:g} (the "
            f"longest {float(plain['largest_step'].max()):.3g}); with clipping {far_clipped}. "
            f"Runs fitted: plain {int((plain['final_loss'] < TRAINED).sum())}, clipped "
            f"{fitted_clipped} of {n_starts}. A plain run thrown off the cliff can still end "
            "at a low loss somewhere else on this two-parameter surface (luck, not learning); "
            "in a real net the jump undoes what was learned. Median final loss: plain "
            f"{statistics.median(plain['final_loss'].tolist()):.2g}, clipped "
            f"{statistics.median(clipped['final_loss'].tolist()):.2g}."
            + ("" if math.isfinite(gmax) else " A gradient became non-finite.")
        ),
        figures={"cliff": fig},
    )
