"""Step-time overhead of gradmedic's monitoring, side by side with alternatives.

Run:  python benchmarks/overhead.py [--rounds 15] [--steps 10] [--threads 1] [--clock cpu]
      [--models mlp transformer thin]

Every configuration trains the same model on the same batch. Configurations
are interleaved round by round (so machine drift hits all alike) and each
reports the median over rounds of its per-step time as a ratio to the bare
step measured in the same round. The default clock is the process's CPU time
with one torch thread: on a shared 2-core machine wall time swings by +-10%
between identical runs, CPU time much less (``--clock wall`` for wall time).

Configurations:
  bare              forward + backward + SGD step
  gm_norms          watch(deltas=False, updates=False): per-layer gradient norms every step
  gm_default        gradmedic.watch(): + deltas every step, update ratios every 10th step,
                    activations and recurrent sampled one step in 20 (the defaults)
  gm_every_step     watch(activations=True, recurrent=True, update_every=1): everything, every step
  torch_clip        torch.nn.utils.clip_grad_norm_ alone (the floor: one read of every gradient)
  foreach_norm      torch._foreach_norm over all gradients (the floor, without the scaling)
  wandb_watch       wandb.watch(model, log="gradients", log_freq=1), offline (if wandb is installed)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

import gradmedic


def mlp() -> tuple[nn.Module, torch.Tensor]:
    layers: list[nn.Module] = []
    for _ in range(19):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    layers.append(nn.Linear(512, 10))
    return nn.Sequential(*layers), torch.randn(128, 512)


def thin() -> tuple[nn.Module, torch.Tensor]:
    """1000 layers: 500 x (Linear(32, 32), ReLU), where per-layer Python costs show."""
    layers: list[nn.Module] = []
    for _ in range(500):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers), torch.randn(64, 32)


def transformer() -> tuple[nn.Module, torch.Tensor]:
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False), torch.randn(16, 64, 256)


@contextlib.contextmanager
def nothing(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    yield lambda: None


@contextlib.contextmanager
def gm(model, opt, **kw) -> Iterator[Callable[[], None]]:
    with gradmedic.watch(model, opt, **kw):
        yield lambda: None


@contextlib.contextmanager
def torch_clip(model, opt) -> Iterator[Callable[[], None]]:
    params = list(model.parameters())
    yield lambda: torch.nn.utils.clip_grad_norm_(params, 1e9)


@contextlib.contextmanager
def foreach_norm(model, opt) -> Iterator[Callable[[], None]]:
    params = list(model.parameters())
    yield lambda: torch._foreach_norm([p.grad for p in params])


@contextlib.contextmanager
def wandb_watch(model, opt) -> Iterator[Callable[[], None]]:
    import wandb

    run = wandb.init(
        mode="offline",
        project="gradmedic-bench",
        dir=tempfile.mkdtemp(),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True),
    )
    wandb.watch(model, log="gradients", log_freq=1)
    try:
        yield lambda: wandb.log({"step": 0})
    finally:
        wandb.unwatch(model)
        run.finish()


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def time_steps(model, x, opt, extra: Callable[[], None], steps: int) -> float:
    start = clock()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        extra()
        opt.step()
    return (clock() - start) / steps


def bench(name: str, build, configs: dict, rounds: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, x = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(2):  # warm-up
        time_steps(model, x, opt, lambda: None, 2)
    for r in range(rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for key in order:
            with configs[key](model, opt) as extra:
                time_steps(model, x, opt, extra, 1)  # first step under hooks: warm-up
                times[key].append(time_steps(model, x, opt, extra, steps))
    bare = statistics.median(times["bare"])
    print(f"\n{name}: bare step {bare * 1e3:.1f} ms (median of {rounds} rounds x {steps} steps)")
    ratios = {}
    for key in configs:
        # ratio per round against that round's bare time, then the median
        per_round = [t / b for t, b in zip(times[key], times["bare"], strict=True)]
        ratios[key] = statistics.median(per_round)
        print(f"  {key:<14} {statistics.median(times[key]) * 1e3:8.1f} ms   x{ratios[key]:.3f}")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="cpu")
    ap.add_argument("--models", nargs="+", default=["mlp", "transformer", "thin"])
    ap.add_argument(
        "--early",
        action="store_true",
        help="keep the early phase (update ratios on each of the first 20 recorded steps); "
        "by default the steady state is measured",
    )
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]
    if not args.early:
        # Steady state: a monitor measures every update of its first 20 recorded steps,
        # which a 10-step round would otherwise be made of entirely.
        import gradmedic.monitor

        gradmedic.monitor.EARLY_UPDATES = 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    configs = {
        "bare": nothing,
        "gm_norms": lambda m, o: gm(m, o, deltas=False, updates=False),
        "gm_default": lambda m, o: gm(m, o),
        "gm_every_step": lambda m, o: gm(m, o, activations=True, recurrent=True, update_every=1),
        "torch_clip": torch_clip,
        "foreach_norm": foreach_norm,
    }
    try:
        import wandb  # noqa: F401

        configs["wandb_watch"] = wandb_watch
    except ImportError:
        print("wandb not installed: skipping wandb.watch (pip install -c constraints.txt wandb)")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, "
        f"gradmedic {gradmedic.__version__}"
    )
    models = {
        "mlp": ("20-layer ReLU MLP, width 512, batch 128", mlp),
        "transformer": ("4-layer transformer encoder, d=256, batch 16 x 64 tokens", transformer),
        "thin": ("1000-layer thin net, 500 x (Linear(32) + ReLU), batch 64", thin),
    }
    results = {
        key: bench(title, build, configs, args.rounds, args.steps)
        for key, (title, build) in models.items()
        if key in args.models
    }
    if "wandb_watch" in configs:
        print("\nOverhead (ratio - 1) of wandb.watch divided by gradmedic's:")
        for name, r in results.items():
            for key in ("gm_norms", "gm_default"):
                ours = r[key] - 1
                if ours < 0.01:  # below the noise of this measurement
                    print(f"  {name:<12} {key:<9} gradmedic's overhead is within noise (<1%)")
                else:
                    print(f"  {name:<12} {key:<9} {(r['wandb_watch'] - 1) / ours:6.1f}x less")


if __name__ == "__main__":
    main()
