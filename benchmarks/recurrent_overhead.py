"""Step time of an RNN/LSTM training step: bare vs RecurrentProbe every step (whole batch,
8 sequences, the monitor's sample) vs every=10.

Run: python benchmarks/recurrent_overhead.py [--steps 30] [--threads 1]

Seq len 100, hidden 128, batch 32, input 32, a linear head on the last output.
The probe is driven the way the Monitor drives it (set_recording, forward,
backward, collect, reset, optimizer step) so its own cost is isolated; the
variants run interleaved, round by round, and the medians are printed as ratios
to the bare step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradmedic.layers import LayerIndex
from gradmedic.probes.recurrent import SAMPLED_SEQUENCES, RecurrentProbe
from gradmedic.record import materialize

T, B, IN, H = 100, 32, 32, 128


class Net(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(IN, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])


def make(cell, every, max_batch=None):
    torch.manual_seed(0)
    model = Net(cell)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = None
    if every is not None:
        probe = RecurrentProbe(every=every, max_batch=max_batch)
        probe.attach(LayerIndex(model))
    return model, opt, probe


def step(model, opt, probe, x, y, i):
    opt.zero_grad(set_to_none=True)
    if probe is not None:
        probe.set_recording(True)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if probe is not None:
        rec = probe.collect(i)
        if rec:
            materialize(rec)  # reading the record is part of the cost
        probe.reset()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="timed rounds per variant")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = torch.randn(T, B, IN), torch.randn(B, 1)
    variants = {
        "bare": (None, None),
        "every=1": (1, None),
        "every=1,mb=8": (1, 8),
        "every=1,monitor": (1, SAMPLED_SEQUENCES),  # the sequences watch() samples
        "every=10": (10, None),
    }
    for cell in (nn.RNN, nn.LSTM):
        runs = {name: make(cell, *v) for name, v in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.steps + 3):  # 3 warm-up rounds
            for name, (model, opt, probe) in runs.items():
                t0 = time.perf_counter()
                step(model, opt, probe, x, y, i)
                if i >= 3:
                    times[name].append(time.perf_counter() - t0)
        # every=10 pays on one step in ten: its mean, not its median, is the cost
        bare = statistics.median(times["bare"])
        one = statistics.median(times["every=1"])
        small = statistics.median(times["every=1,mb=8"])
        sampled = statistics.median(times["every=1,monitor"])
        ten = statistics.mean(times["every=10"]) / statistics.mean(times["bare"])
        print(
            f"nn.{cell.__name__:4s} T={T} H={H} B={B}: bare {bare * 1e3:.1f} ms/step, "
            f"probe every step {one / bare:.2f}x, every step max_batch=8 {small / bare:.2f}x, "
            f"every step max_batch={SAMPLED_SEQUENCES} (watch()'s) {sampled / bare:.2f}x, "
            f"every=10 {ten:.2f}x (mean)"
        )


if __name__ == "__main__":
    main()
