"""The per-step path makes no host read: statistics stay tensors until a record is read.

On CPU nothing synchronises, so the test counts the calls that would on an
accelerator (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool``,
``float`` and ``int`` of a tensor) while the monitored loop runs, against the same
loop unmonitored; then reads the records and checks them against autograd.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import gradmedic

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@contextmanager
def counting_reads() -> Iterator[Counter[str]]:
    """Count every host read of a tensor made from Python while the block runs."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class LM(nn.Module):
    """Embedding, 2-layer LSTM, tanh head: every probe has something to measure."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 12, num_layers=2)
        self.act = nn.Tanh()
        self.out = nn.Linear(12, 20)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(tokens))
        return self.out(self.act(h))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def run(
    make: Callable[[], nn.Module], steps: int, **options: Any
) -> tuple[Counter[str], nn.Module, gradmedic.Monitor | None]:
    """Train ``steps`` SGD steps (monitored unless ``options`` is None) counting host reads."""
    torch.manual_seed(0)
    model = make()
    lm = isinstance(model, LM)
    x = torch.randint(0, 20, (7, 4)) if lm else torch.randn(32, 6)
    y = torch.randint(0, 20, (7, 4)) if lm else torch.randn(32, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = gradmedic.watch(model, opt, **options) if options.get("watch", True) else None
    with counting_reads() as counts:
        for _ in range(steps):
            opt.zero_grad()
            out = model(x)
            if lm:
                loss = nn.functional.cross_entropy(out.reshape(-1, 20), y.reshape(-1))
            else:
                loss = nn.functional.mse_loss(out, y)
            loss.backward()
            opt.step()
    return counts, model, mon


def layer_norms(model: nn.Module) -> dict[str, float]:
    """Per-layer gradient L2 norms of the current ``.grad``, by hand in float64."""
    sums: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            layer = name.rsplit(".", 1)[0]
            sums[layer] = sums.get(layer, 0.0) + p.grad.double().square().sum().item()
    return {k: math.sqrt(v) for k, v in sums.items()}


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (mlp, {}),  # default watch(): activations on steps 0 and 20, updates sampled
        (LM, {}),
        (mlp, {"activations": True, "spectra": True}),
        (LM, {"activations": True, "recurrent": True}),
        (LM, {"activations": True, "recurrent": False, "spectra": True}),
    ],
    ids=["mlp-default", "lstm-default", "mlp-everything", "lstm-everything", "lstm-no-recurrent"],
)
def test_steps_between_reads_make_no_host_read(
    make: Callable[[], nn.Module], options: dict[str, Any]
) -> None:
    steps = 23  # includes the activation/recurrent sampled steps 0 and 20
    bare, _, _ = run(make, steps, watch=False)
    watched, model, mon = run(make, steps, **options)
    assert mon is not None
    assert watched == bare, f"host reads during monitored steps: {watched - bare}"
    rows = mon.history.rows()  # the read: only now do values reach the host
    assert [r["step"] for r in rows] == list(range(steps))
    want = layer_norms(model)  # gradients of the last step are still in .grad
    assert rows[-1]["grad_norm"].keys() == want.keys()
    for layer, value in want.items():
        assert rows[-1]["grad_norm"][layer] == pytest.approx(value, rel=1e-6)
    assert rows[0]["activations"] and "update_ratio" in rows[0]
    if isinstance(model, LM) and options.get("recurrent", True):
        assert rows[0]["recurrent"]["rnn"]["dh_norm"]
    mon.close()


def test_a_batched_sink_reads_only_when_it_writes(tmp_path: Any) -> None:
    path = tmp_path / "run.jsonl"
    bare, _, _ = run(mlp, 10, watch=False)
    watched, _, mon = run(mlp, 10, sink=path, sink_batch=64)
    assert mon is not None
    assert watched == bare
    mon.close()  # writes the batch
    _, rows = gradmedic.history.load_history(path)
    assert [r["step"] for r in rows] == list(range(10))
