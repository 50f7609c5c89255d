"""check() and a watch() that records the same single step name the same problems,
the same activations after each layer and the same module for a NaN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic
from cases import PREFLIGHT, NanMaker
from gradmedic import monitor, preflight
from gradmedic.context import model_context


def loss_of(out: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        return out.float().pow(2).mean()
    return nn.functional.cross_entropy(out, targets)


def completion_order(model: nn.Module, inputs: torch.Tensor) -> list[str]:
    """Submodules in the order their forwards finish, from plain torch hooks."""
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, m in model.named_modules()
        if name
    ]
    try:
        model(inputs)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def nonfinite(diagnosis: gradmedic.Diagnosis) -> list[tuple[object, ...]]:
    return [
        (tuple(f.layers), f.evidence["layer"], f.evidence["where"], tuple(f.evidence["suspects"]))
        for f in diagnosis.by_problem("nonfinite")
    ]


def watched_step(model: nn.Module, inputs, targets) -> gradmedic.Monitor:
    with gradmedic.watch(model) as mon:
        loss_of(model(inputs), targets).backward()
        mon.step()
    return mon


@pytest.mark.parametrize("case", PREFLIGHT, ids=lambda c: c.name)
def test_check_and_watch_agree_at_step_zero(case, monkeypatch) -> None:
    contexts: list[dict] = []

    def spy(*args, **kwargs):
        contexts.append(model_context(*args, **kwargs))
        return contexts[-1]

    monkeypatch.setattr(preflight, "model_context", spy)
    monkeypatch.setattr(monitor, "model_context", spy)
    model, inputs, targets = case.build()
    checked = gradmedic.check(model, inputs, targets)
    model, inputs, targets = case.build()
    mon = watched_step(model, inputs, targets)
    watched = mon.diagnose()
    assert {f.problem for f in watched.findings} == {f.problem for f in checked.findings}
    assert {f.problem for f in checked.findings} == case.expected
    # one tracer: the same forward order, so the same activation after each layer
    model, inputs, _ = case.build()
    expected_order = completion_order(model, inputs)
    of_check, of_watch = contexts
    assert of_check["forward_order"] == of_watch["forward_order"] == expected_order
    assert of_check["activations"] == of_watch["activations"]
    assert nonfinite(checked) == nonfinite(watched)
    for f in checked.findings:  # and the same layers named for each problem
        assert [list(w.layers) for w in watched.by_problem(f.problem)] == [
            list(c.layers) for c in checked.by_problem(f.problem)
        ]


class LogHead(nn.Module):
    """Two Linear layers, then a log of a negative after the last one (a NaN loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
        self.maker = NanMaker()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maker(self.body(x))


@pytest.mark.parametrize(
    ("build", "maker"),
    [
        (lambda: nn.Sequential(nn.Linear(8, 8), NanMaker(), nn.ReLU(), nn.Linear(8, 3)), "1"),
        (LogHead, "maker"),
    ],
    ids=["maker_before_a_layer", "maker_after_the_last_layer"],
)
def test_check_and_watch_name_the_module_that_made_the_nan(build, maker) -> None:
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    assert isinstance(dict(model.named_modules())[maker], NanMaker)
    checked = gradmedic.check(model, x, y)
    mon = watched_step(model, x, y)
    row = mon.history.rows()[0]
    origin = row["nonfinite_origin"]
    assert row["nonfinite_module"] == maker
    assert nonfinite(checked) == nonfinite(mon.diagnose())
    assert checked.by_problem("nonfinite")[0].layers[0] in (maker, origin["layer"])


def test_the_tracer_is_off_after_the_first_record() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    bare = [len(m._forward_hooks) for m in model]
    with gradmedic.watch(model) as mon:
        armed = [len(m._forward_hooks) for m in model]
        after = []
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            mon.step()
            after.append([len(m._forward_hooks) for m in model])
    # one tracer hook per module until the first record, none from then on (the ReLU
    # also loses the activation probe's, which samples one step in 20)
    removed = [a - b for a, b in zip(armed, after[0], strict=True)]
    assert removed[0] == removed[2] == 1 and removed[1] == 2
    assert after[0] == after[1] == after[2]
    assert bare == [0, 0, 0] and mon.forward_order == ["0", "1", "2"]
