"""R8/R9: RNN vs LSTM vs GRU on the adding problem: gradient over time, error, gates."""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

import gradmedic
from gradmedic.lab import plotting, stats
from gradmedic.lab.base import LabConfig, Result, experiment, judge_claims

NAME = "recurrent_adding"
TITLE = "Adding problem: RNN vs LSTM vs GRU (gradient over time, error, gates)"
CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "lstm_forget1": nn.LSTM, "gru": nn.GRU}
LEARNED = 0.1  # "learned": test MSE below this share of the mean-prediction baseline
CLIP = 1.0


def adding(length: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem, standard variant (Le, Jaitly & Hinton 2015).

    Inputs ``(n, length, 2)``: a value ``~ U(0, 1)`` and a marker that is 1 at one step of
    the first half and one step of the second half; target ``(n, 1)``: the sum of the two
    marked values. Predicting the mean scores an MSE of ``Var(u1 + u2) = 2/12 = 1/6``.
    """
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(n, length, generator=gen)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=gen)
    second = torch.randint(half, length, (n,), generator=gen)
    marks = torch.zeros(n, length)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    return torch.stack([values, marks], dim=-1), (values * marks).sum(1, keepdim=True)


class Reader(nn.Module):
    """A recurrent layer reading the sequence, a linear head on its last hidden state.

    ``lstm_forget1`` is an LSTM whose forget-gate bias starts at 1 instead of 0 (Gers et
    al. 2000; Jozefowicz et al. 2015), so its forget gate starts near sigma(1) = 0.73.
    """

    def __init__(self, kind: str, hidden: int) -> None:
        super().__init__()
        self.rnn = CELLS[kind](2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        if kind == "lstm_forget1":  # PyTorch stacks the gates i, f, g, o
            with torch.no_grad():
                self.rnn.bias_ih_l0[hidden : 2 * hidden] = 1.0
                self.rnn.bias_hh_l0[hidden : 2 * hidden] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, T, 2)`` -> ``(batch, 1)`` estimate of the marked sum."""
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def train_reader(
    kind: str, x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int, lr: float, seed: int
) -> tuple[Reader, list[float], list[dict]]:
    """Adam on minibatches of 64, global-norm clipping at 1 (the same for every cell).

    Returns the model, the training losses and the recurrent records (gradmedic.watch with
    ``recurrent=True``) of the first and the last step.
    """
    torch.manual_seed(seed)
    model = Reader(kind, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    last = steps - 1
    with gradmedic.watch(
        model, opt, recurrent=True, every=lambda s: s in (0, last), deltas=False, updates=False
    ) as mon:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gradmedic.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            losses.append(float(loss.detach()))
        records = [row["recurrent"]["rnn"] for row in mon.history.rows()]
    return model, losses, records


def time_ratio(dh: list[float]) -> float:
    """``||dL/dh_1|| / ||dL/dh_T||``: how much of the last step's gradient reaches the first."""
    return dh[0] / dh[-1] if dh[-1] > 0 else math.nan


def kept(ratio: float) -> tuple[bool, bool]:
    """``(not vanished, not exploded)``: step 1's gradient is >= 1/100 and <= 100x step T's."""
    return ratio >= 1e-2, ratio <= 1e2


def cell_run(kind: str, length: int, hidden: int, steps: int, lr: float, n: int, seed: int) -> dict:
    """Train one cell on the adding problem (data drawn from ``seed``); its numbers."""
    x, y = adding(length, n, seed)
    x_test, y_test = adding(length, 1000, seed + 1)
    baseline = float(nn.functional.mse_loss(y.mean().expand_as(y_test), y_test))
    model, losses, (rec0, rec1) = train_reader(kind, x, y, hidden, steps, lr, seed)
    with torch.no_grad():
        mse = float(nn.functional.mse_loss(model(x_test), y_test))
    # The LSTM's claim is about the cell state c; the others only have h.
    along = "dc_norm" if kind.startswith("lstm") else "dh_norm"
    r = {
        "test_mse": mse,
        "baseline_mse": baseline,
        "mse_over_baseline": mse / baseline,
        "loss": losses,
        "gradient_along": along,
        "grad_init": rec0[along],
        "grad_trained": rec1[along],
        "first_over_last_init": time_ratio(rec0[along]),
        "first_over_last_trained": time_ratio(rec1[along]),
    }
    gate = {"lstm": "forget_gate_mean", "gru": "update_gate_mean"}.get(kind[:4])
    if gate:
        r["gate"] = gate
        r["gate_init"] = rec0[gate]
        r["gate_trained"] = rec1[gate]
        r["gate_mean_init"] = statistics.fmean(rec0[gate])
        r["gate_mean_trained"] = statistics.fmean(rec1[gate])
    return r


@experiment(NAME, ["R8", "R9"], TITLE)
def run(config: LabConfig) -> Result:
    length = config.pick(16, 50)
    hidden = config.pick(16, 32)
    steps = config.pick(150, 500)
    lr = config.pick(0.03, 0.01)
    n_train = config.pick(4000, 16000)
    seeds = stats.comparison_seeds(config)
    per_seed = {
        kind: [cell_run(kind, length, hidden, steps, lr, n_train, s) for s in seeds]
        for kind in CELLS
    }
    baseline = statistics.fmean(stats.each(per_seed["rnn"], "baseline_mse"))

    checks: dict[str, dict[str, bool]] = {"R8": {}, "R9": {}}
    for kind, claim in (("lstm", "R8"), ("lstm_forget1", "R8"), ("gru", "R9")):
        checks[claim][f"{kind} learns: test MSE < {LEARNED:g} x baseline in every seed"] = all(
            r["mse_over_baseline"] < LEARNED for r in per_seed[kind]
        )
    for kind, claim in (("lstm", "R8"), ("gru", "R9")):
        what = per_seed[kind][0]["gradient_along"][:2]
        for when in ("init", "trained"):
            kept_ = [kept(r[f"first_over_last_{when}"]) for r in per_seed[kind]]
            checks[claim][f"{kind} ({when}): {what} at step 1 >= 1/100 of step T, every seed"] = (
                all(v for v, _ in kept_)
            )
            checks[claim][f"{kind} ({when}): {what} at step 1 <= 100x step T, every seed"] = all(
                e for _, e in kept_
            )
    verdict, per_claim = judge_claims(checks)
    runs = {kind: _mean_run(rs) for kind, rs in per_seed.items()}
    return Result(
        setup=(
            f"Adding problem: sequences of {length} steps of (value ~ U(0, 1), marker); one "
            "marker in each half; the target is the sum of the two marked values "
            f"({n_train} training sequences, 1000 test, drawn anew for each of the random seeds "
            f"{seeds}). nn.RNN (tanh), nn.LSTM (PyTorch's "
            "default init: forget bias 0), nn.LSTM with forget-gate bias 1, and nn.GRU, "
            f"{hidden} hidden units, a linear head on the last state; Adam lr {lr}, batch 64, "
            f"{steps} steps, global-norm clipping at {CLIP:g} for all. gradmedic.watch("
            "recurrent=True) records ||dL/dh_t|| (LSTM: ||dL/dc_t||) per time step and the gate "
            "means at the first and the last step."
        ),
        expected=(
            "R8: the LSTM's gradient is carried along the cell state, scaled by a forget gate "
            "per step rather than by one matrix, so it neither explodes nor vanishes and the "
            "long-range sum can be learned. R9: the GRU's update gate mixes the old state in "
            "like a residual connection, with the same effect."
        ),
        numbers={
            "seq_len": length,
            "hidden": hidden,
            "steps": steps,
            "baseline_mse": baseline,
            "baseline_closed_form": 1 / 6,
            "seeds": seeds,
            "mse_over_baseline": {
                k: stats.summary(stats.each(rs, "mse_over_baseline")) for k, rs in per_seed.items()
            },
            "runs": runs,
            "per_seed": per_seed,
            "checks": checks,
        },
        rule=(
            "baseline_mse = test MSE of always predicting the training mean (Var(u1 + u2) = "
            f"1/6 in closed form); a model has learned when its test MSE < {LEARNED:g} x "
            "baseline. first_over_last = ||dL/dc_1|| / ||dL/dc_T|| (LSTM) or ||dL/dh_1|| / "
            "||dL/dh_T|| (GRU) over one batch at the first (init) and last (trained) step: "
            "vanished below 1e-2, exploded above 1e2. Each claim: all its checks pass -> holds, "
            "some -> holds partly, none -> does not hold."
        ),
        verdict=verdict,
        per_claim=per_claim,
        explanation=f"Means over {len(seeds)} seeds. "
        + explain(runs, baseline)
        + stats.seed_note(config, seeds),
        figures={"gradient_over_time": figure(per_seed, baseline)},
    )


def explain(runs: dict[str, dict], baseline: float) -> str:
    """The measurements in words, the clauses chosen by the numbers."""
    lstm, gru = runs["lstm"], runs["gru"]
    text = [
        f"Test MSE / baseline ({baseline:.3f}): "
        + ", ".join(f"{k} {r['mse_over_baseline']:.3f}" for k, r in runs.items())
        + ".",
        "Gradient at step 1 / at step T, init -> trained: "
        + ", ".join(
            f"{k} {r['first_over_last_init']:.2g} -> {r['first_over_last_trained']:.2g}"
            for k, r in runs.items()
        )
        + ".",
        f"Mean LSTM forget gate {lstm['gate_mean_init']:.2f} -> {lstm['gate_mean_trained']:.2f} "
        f"(forget bias 1: {runs['lstm_forget1']['gate_mean_init']:.2f} -> "
        f"{runs['lstm_forget1']['gate_mean_trained']:.2f}); mean GRU keep gate (PyTorch's z, "
        f"the share of h_(t-1) copied; source 000's z is 1 - this) {gru['gate_mean_init']:.2f} -> "
        f"{gru['gate_mean_trained']:.2f}.",
    ]
    if lstm["first_over_last_init"] < 1e-2:
        text.append(
            "At initialization the LSTM's gradient along c vanishes too: each step multiplies "
            f"it by a forget gate near {lstm['gate_mean_init']:.2f}. The gate is a per-step, "
            "learnable factor rather than a fixed matrix, so training (or a forget bias of 1) "
            "can open it; the path is not loss-free from the start."
        )
    if runs["rnn"]["mse_over_baseline"] > 0.5:
        text.append("The plain RNN stays near the mean-prediction baseline.")
    return " ".join(text)


def _mean_run(rs: list[dict]) -> dict:
    """The seeds' runs of one cell averaged: numbers by mean, curves element-wise."""
    out: dict = {}
    for key, v in rs[0].items():
        if isinstance(v, str):
            out[key] = v
        elif isinstance(v, list):
            out[key] = stats.mean_profile([r[key] for r in rs])
        else:
            out[key] = statistics.fmean(float(r[key]) for r in rs)
    return out


def figure(per_seed: dict[str, list[dict]], baseline: float) -> object:
    """Gradient over time, training loss, gate means over time (mean of seeds, min..max band)."""
    fig, (ax_g, ax_l, ax_z) = plotting.figure(3, width=3.6)
    for k, (kind, rs) in enumerate(per_seed.items()):
        t = range(1, len(rs[0]["grad_trained"]) + 1)
        mean = _mean_run(rs)
        plotting.band(ax_g, t, [r["grad_trained"] for r in rs], label=kind, color=f"C{k}",
                      log=True)  # fmt: skip
        plotting.profile(ax_g, t, mean["grad_init"], label=None, predicted=True, color=f"C{k}")
        plotting.band(ax_l, range(1, len(rs[0]["loss"]) + 1), [r["loss"] for r in rs],
                      label=kind, color=f"C{k}", log=True)  # fmt: skip
        if "gate_trained" in mean:
            name = f"{kind} " + (
                "forget gate" if mean["gate"].startswith("forget") else "keep gate z"
            )
            plotting.band(ax_z, t, [r["gate_trained"] for r in rs], label=name, color=f"C{k}")
            plotting.profile(ax_z, t, mean["gate_init"], label=None, predicted=True,
                             color=f"C{k}", log=False)  # fmt: skip
    ax_l.axhline(baseline, color="gray", linestyle=":", label="predict the mean")
    plotting.label(
        ax_g, "gradient over time (dashed: init)", "time step t", "||dL/dh_t|| (LSTM: dL/dc_t)"
    )
    plotting.label(ax_l, "training loss", "Adam step", "MSE")
    plotting.label(ax_z, "gate means (dashed: init)", "time step t", "mean gate value")
    return fig
