"""Step-time cost of clipping plus per-layer gradient norms, gradmedic versus plain torch.

Run:  python benchmarks/clipping.py [--rounds 7] [--steps 10] [--threads 2] [--device cpu]

Every configuration trains the same model on the same batch; configurations are
interleaved round by round and each reports the median over rounds of its
per-step time as a ratio to the bare step of the same round (the timing loop is
shared with benchmarks/overhead.py). The clip threshold is small enough that every
step really scales its gradients.

Configurations:
  bare               forward + backward + SGD step
  torch_clip         torch.nn.utils.clip_grad_norm_ alone
  gm_clip            gradmedic.clip_grad_norm_ alone (should equal torch_clip)
  torch_clip+loop    torch clip, then per-layer norms the usual way (p.grad.norm() per
                     parameter, combined per layer): what a user does without gradmedic
  torch_clip+fused   torch clip, then per-layer norms by one torch._foreach_norm
                     (the second fused pass a careful user would write)
  gm_watch+clip      gradmedic.watch(deltas=False, updates=False) + gradmedic.clip_grad_norm_:
                     the monitor reuses the clip's norms, so the gradients are read once
  gm_full+clip       gradmedic.watch() (deltas, update ratios) + gradmedic.clip_grad_norm_
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch
from overhead import bench, gm, mlp, nothing, transformer
from torch import nn

import gradmedic

MAX_NORM = 1e-3


@contextlib.contextmanager
def torch_clip(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    params = list(model.parameters())
    yield lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM)


@contextlib.contextmanager
def gm_clip(model, opt) -> Iterator[Callable[[], None]]:
    params = list(model.parameters())
    yield lambda: gradmedic.clip_grad_norm_(params, MAX_NORM)


def _layers(model: nn.Module) -> list[list[nn.Parameter]]:
    out = [list(m.parameters(recurse=False)) for m in model.modules()]
    return [ps for ps in out if ps]


@contextlib.contextmanager
def torch_clip_loop(model, opt) -> Iterator[Callable[[], None]]:
    params, layers = list(model.parameters()), _layers(model)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        [torch.stack([p.grad.norm() for p in ps]).norm() for ps in layers]

    yield step


@contextlib.contextmanager
def torch_clip_fused(model, opt) -> Iterator[Callable[[], None]]:
    params, layers = list(model.parameters()), _layers(model)
    sizes = [len(ps) for ps in layers]

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        norms = torch.stack(torch._foreach_norm([p.grad for ps in layers for p in ps]))
        [chunk.norm() for chunk in norms.split(sizes)]

    yield step


@contextlib.contextmanager
def gm_watch_clip(model, opt, **kw) -> Iterator[Callable[[], None]]:
    params = list(model.parameters())
    with gm(model, opt, **kw):
        yield lambda: gradmedic.clip_grad_norm_(params, MAX_NORM)


def on_device(build: Callable, device: str) -> Callable:
    def built() -> tuple[nn.Module, torch.Tensor]:
        model, x = build()
        return model.to(device), x.to(device)

    return built


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = {
        "bare": nothing,
        "torch_clip": torch_clip,
        "gm_clip": gm_clip,
        "torch_clip+loop": torch_clip_loop,
        "torch_clip+fused": torch_clip_fused,
        "gm_watch+clip": lambda m, o: gm_watch_clip(m, o, deltas=False, updates=False),
        "gm_full+clip": gm_watch_clip,
    }
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}")
    for name, build in (
        ("20-layer ReLU MLP, width 512, batch 128", mlp),
        ("4-layer transformer encoder, d=256, batch 16 x 64 tokens", transformer),
    ):
        r = bench(name, on_device(build, args.device), configs, args.rounds, args.steps)
        for ref in ("torch_clip", "torch_clip+loop"):
            ratio = (r["gm_watch+clip"] - 1) / max(r[ref] - 1, 1e-9)
            print(f"  overhead of gm_watch+clip / overhead of {ref}: {ratio:.2f}")


if __name__ == "__main__":
    main()
