"""The runtime curvature probe: the secant along the update, against a closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic
from gradmedic.probes.curvature import CurvatureProbe


def _run(probe: CurvatureProbe | None, steps: int = 4):
    torch.manual_seed(0)
    h = torch.diag(torch.tensor([1.0, 4.0, 9.0]))
    model = nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    ws = [model.weight.detach().reshape(-1).clone()]
    probes = [probe] if probe is not None else []
    with gradmedic.watch(model, opt, every=1, probes=probes) as mon:
        for _ in range(steps):
            opt.zero_grad()
            w = model.weight.reshape(-1)
            (0.5 * w @ h @ w).backward()
            opt.step()
            ws.append(model.weight.detach().reshape(-1).clone())
    return mon.history.rows(), ws, h


@pytest.mark.filterwarnings("ignore:.*no per-layer deltas:RuntimeWarning")
def test_secant_is_the_rayleigh_quotient_of_the_hessian_along_the_step():
    rows, ws, h = _run(CurvatureProbe(every=1))
    assert "curvature" not in rows[0]
    for k in range(1, len(rows)):
        dw = ws[k] - ws[k - 1]  # the change between the steps the gradients were taken at
        expected = float(dw @ h @ dw / (dw @ dw))
        assert float(rows[k]["curvature"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*no per-layer deltas:RuntimeWarning")
def test_the_probe_changes_nothing_and_samples_every_kth_step():
    _, with_probe, _ = _run(CurvatureProbe(every=2), steps=5)
    _, without, _ = _run(None, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(with_probe, without, strict=True))
    rows, _, _ = _run(CurvatureProbe(every=2), steps=5)
    assert [("curvature" in r) for r in rows] == [False, True, False, True, False]


def test_memory_is_bounded_by_max_elements():
    probe = CurvatureProbe(every=1, max_elements=100)
    model = nn.Linear(50, 40)  # 2040 elements
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradmedic.watch(model, opt, every=1, probes=[probe]):
        opt.zero_grad()
        model(torch.randn(4, 50)).pow(2).mean().backward()
        opt.step()
        assert probe._previous is not None
        assert probe._previous[1].numel() <= 100 + 2  # + at most one per parameter


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(ValueError, match="every must be >= 1"):
        CurvatureProbe(every=0)
    with pytest.raises(ValueError, match="max_elements"):
        CurvatureProbe(max_elements=0)
