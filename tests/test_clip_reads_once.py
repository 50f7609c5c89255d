"""Monitored norm clipping reads each gradient once: the clip's norms, max and min.

Under :func:`gradmedic.watch`, :func:`gradmedic.clip_grad_norm_` takes its norms from
the monitor's read, which also takes each gradient's max and min while it is in cache;
the record scales them by the clip's factor and the next end-of-backward pass reads
nothing. Counted with a dispatch mode (not timed); the numbers must stay torch's.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradmedic

_REDUCTIONS = {"norm", "linalg_vector_norm", "amax", "amin", "aminmax", "max", "min", "abs", "sum"}


class _GradReads(TorchDispatchMode):
    """Counts reductions whose input is one of the watched gradients (by data pointer)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        name = func.overloadpacket.__name__.removeprefix("_foreach_")
        first = args[0] if args else None
        inputs = first if isinstance(first, list | tuple) else [first]  # a fused op's list
        if name in _REDUCTIONS:
            grads = {p.grad.data_ptr() for p in self.model.parameters() if p.grad is not None}
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.numel() >= 1 << 18 and t.data_ptr() in grads:
                    self.reads["linalg_vector_norm" if name == "norm" else name] += 1
        return func(*args, **(kwargs or {}))


def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    # two 512 x 512 weights (2^18 elements: read one by one), biases of one shape (a stack)
    model = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 8)
    )
    return model, torch.randn(16, 512), torch.randn(16, 8)


def train(watched: bool, clip: object, steps: int = 4, count: bool = False):
    model, x, y = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradmedic.watch(model, opt) if watched else None
    counter = _GradReads(model)
    rows, truth = [], []
    try:
        for step in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if count and step == steps - 1:
                with counter:  # the backward pass (with the monitor's snapshot), clip, step
                    loss.backward()
                    clip(model.parameters(), 0.01)  # type: ignore[operator]
                    opt.step()
                continue
            loss.backward()
            pre = {n: p.grad.clone() for n, p in model.named_parameters()}
            clip(model.parameters(), 0.01)  # type: ignore[operator]
            post = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            truth.append((pre, post))
        if mon is not None:
            rows = mon.history.rows()
    finally:
        if mon is not None:
            mon.close()
    return [p.detach().clone() for p in model.parameters()], rows, truth, counter.reads


def test_watched_clip_is_torchs_clip_bit_for_bit_with_large_gradients() -> None:
    reference, _, _, _ = train(False, torch.nn.utils.clip_grad_norm_)
    watched, _, _, _ = train(True, gradmedic.clip_grad_norm_)
    assert all(torch.equal(a, b) for a, b in zip(watched, reference, strict=True))


def test_the_record_holds_the_clips_reading_scaled() -> None:
    _, rows, truth, _ = train(True, gradmedic.clip_grad_norm_)
    assert len(rows) == len(truth)
    for row, (pre, post) in zip(rows, truth, strict=True):
        for layer in ("0", "2", "4"):
            mine = [n for n in pre if n.startswith(layer + ".")]
            # max |g| after the clip: exact (scaling by one factor keeps the max's place)
            assert row["grad_max"][layer] == max(float(post[n].abs().max()) for n in mine)
            after = math.sqrt(sum(float(post[n].double().norm()) ** 2 for n in mine))
            before = math.sqrt(sum(float(pre[n].double().norm()) ** 2 for n in mine))
            assert row["grad_norm"][layer] == pytest.approx(after, rel=1e-5)
            assert row["pre_clip_grad_norm"][layer] == pytest.approx(before, rel=1e-5)
        assert row["global_grad_norm"] == pytest.approx(0.01, rel=1e-4)


def test_each_large_gradient_is_read_once_per_step_under_watch_and_clip() -> None:
    # backward, clip and step: one norm, one max and one min per 512 x 512 gradient (the
    # end-of-backward snapshot reads none once the clip reads them), as unwatched the clip
    # reads its norm
    _, _, _, reads = train(True, gradmedic.clip_grad_norm_, count=True)
    assert reads == Counter({"linalg_vector_norm": 2, "amax": 2, "amin": 2})
    _, _, _, bare = train(False, gradmedic.clip_grad_norm_, count=True)
    assert bare == Counter({"linalg_vector_norm": 2})


def test_a_step_without_the_clip_is_read_whole_again() -> None:
    model, x, y = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradmedic.watch(model, opt) as mon:
        for step in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if step != 2:
                gradmedic.clip_grad_norm_(model.parameters(), 0.01)
            norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
            biggest = {n: float(p.grad.abs().max()) for n, p in model.named_parameters()}
            opt.step()
            row = mon.history.rows()[-1]
            assert ("clip" in row) == (step != 2)
            assert ("pre_clip_grad_norm" in row) == (step != 2)
            for layer in ("0", "2", "4"):
                mine = [n for n in norms if n.startswith(layer + ".")]
                l2 = math.sqrt(sum(norms[n] ** 2 for n in mine))
                assert row["grad_norm"][layer] == pytest.approx(l2, rel=1e-5)
                assert row["grad_max"][layer] == max(biggest[n] for n in mine)
