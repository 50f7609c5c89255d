"""gradmedic's overhead side by side with the alternatives, in one interleaved run.

Run:  python benchmarks/compare.py [--quick] [--rounds 5] [--steps 5] [--no-write]

Every row trains the same model on the same batch; rows are interleaved round
by round (machine drift hits all alike) and each figure is the median over
rounds of the row's step time divided by the bare step of the same round
(process CPU time, one torch thread). Steady state: the monitor's first 20
recorded steps, which measure every update, are skipped (``EARLY_UPDATES = 0``).

Rows: torch ``clip_grad_norm_`` alone; a per-parameter ``.norm().item()`` loop;
Lightning's ``grad_norm`` utility; gradmedic norms only (``deltas=False,
updates=False`` and the sampled probes off), default ``watch()``, ``every=10``,
and everything every step (``activations=True, recurrent=True, update_every=1``); ``wandb.watch(log=
"gradients", log_freq=1)`` offline and traintools' ``GradientHealthMonitor``
when installed. Models: the 20-layer MLP, the transformer, the 1000-layer thin
net, a digits ResNet-style CNN, a 2-layer LSTM LM (bptt 35, hidden 200); then
the 10/100/1000-layer scaling series, a compiled MLP, and gradmedic's extra
memory as a percentage of parameter memory, and the operators each configuration
adds to a step (`operator_counts.py`). The table replaces the block
between the ``compare.py`` markers in ``docs/benchmarks.md`` (``--no-write``:
print only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import operator_counts
import overhead

import gradmedic
import gradmedic.monitor
from gradmedic.record import NamedVector

DOC = Path(__file__).parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- compare.py:begin -->", "<!-- compare.py:end -->"


# ---------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def cnn() -> tuple[nn.Module, torch.Tensor]:
    """ResNet-style CNN for 8x8 digits: conv stem, 3 residual blocks of 32 channels, head."""
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        *[Block(32) for _ in range(3)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return model, torch.randn(64, 1, 8, 8)


class WordLM(nn.Module):
    """Embedding, 2-layer LSTM (hidden 200), decoder: the classic small word LM."""

    def __init__(self, vocab: int = 2000, hidden: int = 200) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, num_layers=2)
        self.dec = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(tokens))
        return self.dec(out)


def lstm() -> tuple[nn.Module, torch.Tensor]:
    return WordLM(), torch.randint(0, 2000, (35, 20))  # bptt 35, batch 20


def depth(n: int, width: int = 32, batch: int = 64) -> Callable[[], tuple[nn.Module, torch.Tensor]]:
    """A thin net of ``n`` layers: ``n // 2`` x (Linear(width, width), ReLU)."""

    def build() -> tuple[nn.Module, torch.Tensor]:
        layers: list[nn.Module] = []
        for _ in range(n // 2):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers), torch.randn(batch, width)

    return build


def compiled_mlp() -> tuple[nn.Module, torch.Tensor]:
    model, x = overhead.mlp()
    return torch.compile(model), x


# ---------------------------------------------------------------- rows
@contextlib.contextmanager
def item_loop(model: nn.Module, opt: Any) -> Iterator[Callable[[], None]]:
    params = list(model.parameters())
    yield lambda: [p.grad.norm().item() for p in params if p.grad is not None]  # type: ignore[func-returns-value]


@contextlib.contextmanager
def lightning_grad_norm(model: nn.Module, opt: Any) -> Iterator[Callable[[], None]]:
    from lightning.pytorch.utilities import grad_norm

    yield lambda: grad_norm(model, 2)  # type: ignore[func-returns-value]


@contextlib.contextmanager
def traintools_monitor(model: nn.Module, opt: Any) -> Iterator[Callable[[], None]]:
    from traintools import GradientHealthMonitor

    monitor = GradientHealthMonitor()
    lr = opt.param_groups[0]["lr"]
    yield lambda: monitor.inspect(model, step=0, lr=lr)  # type: ignore[func-returns-value]


def gm_row(**options: Any) -> Callable[[nn.Module, Any], Any]:
    return lambda m, o: overhead.gm(m, o, **options)


ROWS: dict[str, tuple[str, Callable[[nn.Module, Any], Any]]] = {
    "bare": ("bare step", overhead.nothing),
    "torch_clip": ("torch `clip_grad_norm_` alone", overhead.torch_clip),
    "item_loop": ("per-parameter `.norm().item()` loop", item_loop),
    "lightning": ("Lightning `grad_norm(model, 2)`", lightning_grad_norm),
    "gm_norms": (
        "gradmedic norms only (`deltas=updates=activations=recurrent=False`)",
        gm_row(**operator_counts.CONFIGS["norms only"]),
    ),
    "gm_default": (
        "gradmedic default `watch()`",
        gm_row(**operator_counts.CONFIGS["default `watch()`"]),
    ),
    "gm_every10": ("gradmedic `every=10`", gm_row(every=10)),
    "gm_everything": (
        "gradmedic everything every step (`activations=True, recurrent=True, update_every=1`)",
        gm_row(**operator_counts.CONFIGS["everything every step"]),
    ),
    "wandb": ("`wandb.watch(log=\"gradients\", log_freq=1)`, offline", overhead.wandb_watch),
    "traintools": ("traintools `GradientHealthMonitor.inspect`", traintools_monitor),
}  # fmt: skip


def available(keys: list[str]) -> list[str]:
    """The rows whose package imports; say why the others are skipped."""
    needs = {"lightning": "lightning.pytorch", "wandb": "wandb", "traintools": "traintools"}
    out = []
    for key in keys:
        module = needs.get(key)
        if module is not None:
            try:
                __import__(module)
            except ImportError as exc:
                print(
                    f"skipping {key}: {exc} (pip install -c constraints.txt {module.split('.')[0]})"
                )
                continue
        out.append(key)
    return out


# ---------------------------------------------------------------- memory
def extra_memory(
    build: Callable[[], tuple[nn.Module, torch.Tensor]], steps: int = 30
) -> tuple[float, float]:
    """Default watch(): the largest update copy (% of parameter bytes), KiB per unread record."""
    torch.manual_seed(0)
    model, x = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = 0
    with gradmedic.watch(model, opt) as mon:
        probe = mon._updates
        assert probe is not None
        after = probe.after

        def measured_after() -> None:
            nonlocal peak
            peak = max(peak, sum(t.numel() * t.element_size() for t in probe._snapshot or []))
            after()

        probe.after = measured_after  # type: ignore[method-assign]
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model(x).float().pow(2).mean().backward()
            opt.step()
        held = sum(_tensor_bytes(r._data) for r in mon.history._records)
    return 100 * peak / param_bytes, held / steps / 1024


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, NamedVector):
        value = value.values
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


# ---------------------------------------------------------------- run
MODELS = {
    "mlp": ("20-layer ReLU MLP w512", overhead.mlp),
    "transformer": ("4-layer transformer d256", overhead.transformer),
    "thin": ("1000-layer thin net", overhead.thin),
    "cnn": ("digits ResNet-style CNN", cnn),
    "lstm": ("2-layer LSTM LM (bptt 35, h 200)", lstm),
}


def counted_models() -> dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]]:
    """The models whose operators per step are counted: the five above, and 10 and 100 layers."""
    models = {title: build for title, build in MODELS.values()}
    models.update({f"{n} layers": depth(n) for n in (10, 100)})
    return models


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="3 rounds x 3 steps, no compiled row")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md")
    args = ap.parse_args()
    rounds, steps = (3, 3) if args.quick else (args.rounds, args.steps)
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_SILENT", "true")
    gradmedic.monitor.EARLY_UPDATES = 0
    keys = available(list(ROWS))
    configs = {k: ROWS[k][1] for k in keys}
    results = {
        m: overhead.bench(title, build, configs, rounds, steps)
        for m, (title, build) in MODELS.items()
    }

    scale_keys = ["bare", "torch_clip", "gm_norms", "gm_default"]
    scaling = {
        n: overhead.bench(
            f"{n}-layer thin net", depth(n), {k: ROWS[k][1] for k in scale_keys}, rounds, steps
        )
        for n in (10, 100, 1000)
    }
    compiled: dict[str, float] | None = None
    if not args.quick:
        try:
            compiled = overhead.bench(
                "compiled MLP (torch.compile)",
                compiled_mlp,
                {k: ROWS[k][1] for k in ("bare", "gm_default")},
                rounds,
                steps,
            )
        except Exception as exc:  # no C++ compiler, say why and go on
            print(f"skipping the compiled row: {exc!r}")
    memory = {m: extra_memory(build) for m, (_, build) in MODELS.items()}
    operators = operator_counts.table(counted_models())

    cmd = "python benchmarks/compare.py" + (
        " --quick" if args.quick else f" --rounds {rounds} --steps {steps}"
    )
    table = render(cmd, keys, results, scaling, compiled, memory, rounds, steps, operators)
    print("\n" + table)
    if not args.no_write:
        write_section(table)
        print(f"written to {DOC}")


def render(
    cmd: str,
    keys: list[str],
    results: dict[str, dict[str, float]],
    scaling: dict[int, dict[str, float]],
    compiled: dict[str, float] | None,
    memory: dict[str, tuple[float, float]],
    rounds: int,
    steps: int,
    operators: str,
) -> str:
    skipped = [k for k in ROWS if k not in keys]
    lines = [
        "## Overhead side by side: `benchmarks/compare.py`",
        f"`{cmd}` (torch {torch.__version__}, 1 thread, process CPU time, median over {rounds} "
        f"interleaved rounds of {steps} steps, steady state; ratio to the bare step of the "
        "same round). "
        f"Machine: {os.cpu_count()} CPU cores. Rows that add almost no work (the `.item()` "
        "loop, `every=10`) show the run's noise, a few percent either side of their true cost.",
        "",
        "| | " + " | ".join(title for title, _ in MODELS.values()) + " |",
        "|---|" + "---|" * len(MODELS),
    ]
    for key in keys:
        if key == "bare":
            continue
        cells = [f"{results[m][key]:.3f}" for m in MODELS]
        lines.append(f"| {ROWS[key][0]} | " + " | ".join(cells) + " |")
    if skipped:
        lines.append(f"\nNot installed, skipped: {', '.join(skipped)}.")
    lines += [
        "",
        "Scaling in depth (thin nets of Linear(32) + ReLU):",
        "",
        "| layers | 10 | 100 | 1000 |",
        "|---|---|---|---|",
    ]
    for key in ("torch_clip", "gm_norms", "gm_default"):
        lines.append(
            f"| {ROWS[key][0]} | " + " | ".join(f"{scaling[n][key]:.3f}" for n in scaling) + " |"
        )
    if compiled is not None:
        lines.append(
            "\nCompiled MLP (`torch.compile`, inductor): default `watch()` "
            f"x{compiled['gm_default']:.3f} compiled bare."
        )
    lines += [
        "",
        "Extra memory of default `watch()`: the largest update-ratio copy as % of parameter "
        "memory (at least 2^14 elements, 64 KiB, so small models are copied whole), and the device "
        "tensors one unread record holds (the history keeps up to 1000; they are per-layer "
        "statistics, not parameter-sized):",
        "",
        "| | " + " | ".join(title for title, _ in MODELS.values()) + " |",
        "|---|" + "---|" * len(MODELS),
        "| update copy | " + " | ".join(f"{memory[m][0]:.1f}%" for m in MODELS) + " |",
        "| KiB per unread record | " + " | ".join(f"{memory[m][1]:.1f}" for m in MODELS) + " |",
        "",
        "Operators the monitor adds to a steady-state step (`benchmarks/operator_counts.py`: "
        "every torch operator dispatched, monitored minus bare, averaged over 20 steps, which "
        "hold one step of each probe sampled one in 20). Each costs a few microseconds on CPU "
        "whatever its size: this is the fixed cost per step, exact and free of machine noise.",
        "",
        operators,
    ]
    return "\n".join(lines)


def write_section(table: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:  # first run: the section goes right after the page title
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{block}\n{body}"
    DOC.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
