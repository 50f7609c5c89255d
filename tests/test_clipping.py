import math
import warnings

import pytest
import torch

import gradmedic
from gradmedic.remedies import clipping

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(7,), (3, 5), (2, 3, 4), (1,), (4, 1, 3, 3)]


def _param_sets(dtypes, scale=1.0, seed=0):
    """Two identical copies of a set of parameters of mixed shapes/dtypes with random grads."""
    gen = torch.Generator().manual_seed(seed)
    a, b = [], []
    for i, shape in enumerate(SHAPES * 2):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        g = (torch.randn(shape, generator=gen) * scale * (i + 1)).to(dtype)
        q = torch.nn.Parameter(p.detach().clone())
        p.grad, q.grad = g.clone(), g.clone()
        a.append(p)
        b.append(q)
    # a parameter without a gradient is skipped by both
    a.append(torch.nn.Parameter(torch.ones(3)))
    b.append(torch.nn.Parameter(torch.ones(3)))
    return a, b


def _rel(x, y):
    x, y = x.double(), y.double()
    return float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize(
    "dtypes",
    [[torch.float32], [torch.float64], [torch.float16], [torch.bfloat16], DTYPES],
    ids=["f32", "f64", "f16", "bf16", "mixed"],
)
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_norm_matches_torch(norm_type, dtypes, foreach):
    ours, ref = _param_sets(dtypes)
    # max_norm below the total so clipping really happens
    max_norm = 0.5
    got = gradmedic.clip_grad_norm_(ours, max_norm, norm_type=norm_type, foreach=foreach)
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=foreach)
    assert got.dtype == want.dtype
    assert _rel(got, want) <= 1e-6
    for p, q in zip(ours, ref, strict=True):
        if q.grad is None:
            assert p.grad is None
            continue
        assert p.grad.dtype == q.grad.dtype
        assert _rel(p.grad, q.grad) <= 1e-6


def test_clip_grad_norm_by_hand():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(1))
    w.grad = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # squares sum to 25
    b.grad = torch.tensor([-6.0])  # total = sqrt(25 + 36)
    total = math.sqrt(1 + 4 + 4 + 16 + 36)
    got = gradmedic.clip_grad_norm_([w, b], max_norm=2.0)
    assert float(got) == pytest.approx(total, rel=1e-6)
    coef = 2.0 / (total + 1e-6)
    assert w.grad.flatten().tolist() == pytest.approx(
        [coef, 2 * coef, 2 * coef, 4 * coef], rel=1e-6
    )
    assert b.grad.tolist() == pytest.approx([-6 * coef], rel=1e-6)
    # below the threshold nothing changes
    before = w.grad.clone()
    gradmedic.clip_grad_norm_([w, b], max_norm=10.0)
    assert torch.equal(w.grad, before)


def test_clip_grad_norm_single_tensor_and_empty():
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([0.0, 3.0, 4.0])
    assert float(gradmedic.clip_grad_norm_(w, 100.0)) == pytest.approx(5.0)
    assert float(gradmedic.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0)) == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        gradmedic.clip_grad_norm_((p for p in []), 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nonfinite_matches_torch(bad, norm_type):
    ours, ref = _param_sets([torch.float32, torch.float64])
    ours[1].grad[0, 0] = bad
    ref[1].grad[0, 0] = bad
    with pytest.raises(RuntimeError) as torch_err:
        torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    with pytest.raises(type(torch_err.value), match="non-finite"):
        gradmedic.clip_grad_norm_(ours, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    assert isinstance(gradmedic.GradmedicError("x"), RuntimeError)
    # error_if_nonfinite=False: same (non-finite) numbers as torch
    got = gradmedic.clip_grad_norm_(ours, 1.0, norm_type=norm_type)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type=norm_type)
    assert math.isnan(float(got)) == math.isnan(float(want))
    if not math.isnan(float(want)):
        assert float(got) == float(want)
    for p, q in zip(ours, ref, strict=True):
        if q.grad is not None:
            assert torch.equal(p.grad.isnan(), q.grad.isnan())
            same = ~q.grad.isnan()
            assert torch.equal(p.grad[same], q.grad[same])


@pytest.mark.parametrize(
    "dtypes", [[torch.float32], [torch.float16], DTYPES], ids=["f32", "f16", "mixed"]
)
def test_clip_grad_value_matches_torch(dtypes):
    ours, ref = _param_sets(dtypes, scale=3.0)
    assert gradmedic.clip_grad_value_(ours, 1.25) is None
    torch.nn.utils.clip_grad_value_(ref, 1.25)
    for p, q in zip(ours, ref, strict=True):
        if q.grad is not None:
            assert torch.equal(p.grad, q.grad)
            assert float(p.grad.abs().max()) <= 1.25


def test_clip_grad_value_by_hand():
    w = torch.nn.Parameter(torch.zeros(4))
    w.grad = torch.tensor([-3.0, -0.5, 0.25, 9.0])
    gradmedic.clip_grad_value_([w], clip_value=1.0, foreach=False)
    assert w.grad.tolist() == [-1.0, -0.5, 0.25, 1.0]


def test_bad_arguments():
    with pytest.raises(TypeError, match="parameters"):
        gradmedic.clip_grad_norm_(3, 1.0)


class _FakeMonitor:
    def __init__(self):
        self.notes = []

    def read_for_clip(self, params, grads):
        return None  # the clip reads its own norms

    def note_clip(self, params, norms, info, maxes=None):
        self.notes.append((params, norms, info))


def test_monitor_gets_the_pre_clip_norms(monkeypatch):
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    w.grad = torch.tensor([3.0, 4.0])
    b.grad = torch.tensor([12.0])
    fake = _FakeMonitor()
    seen = []

    class _Module:
        @staticmethod
        def find_monitor(params):
            seen.append(params)
            return fake

    monkeypatch.setattr(clipping, "_MONITOR", [_Module])
    total = gradmedic.clip_grad_norm_([w, b], max_norm=6.5)
    assert float(total) == pytest.approx(13.0)
    ((params, norms, info),) = fake.notes
    assert params == [w.grad, b.grad] and seen == [[w, b]]
    assert [float(n) for n in norms] == pytest.approx([5.0, 12.0])
    assert info["kind"] == "norm" and info["threshold"] == 6.5
    assert bool(info["clipped"]) and float(info["scale"]) == pytest.approx(0.5, rel=1e-6)

    # value clipping: pre-clip total, whether anything was clamped, post/pre norm ratio
    w.grad = torch.tensor([3.0, 4.0])
    b.grad = torch.tensor([0.0])
    gradmedic.clip_grad_value_([w, b], 3.5)
    params, norms, info = fake.notes[-1]
    assert norms is None and info["kind"] == "value"
    assert float(info["total_norm"]) == pytest.approx(5.0)
    assert bool(info["clipped"])
    assert float(info["scale"]) == pytest.approx(math.sqrt(9 + 12.25) / 5.0, rel=1e-6)


def test_monitor_errors_never_reach_the_training_loop(monkeypatch):
    class _Broken:
        @staticmethod
        def find_monitor(params):
            raise KeyError("boom")

    monkeypatch.setattr(clipping, "_MONITOR", [_Broken])
    monkeypatch.setattr(clipping, "_WARNED", set())
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert float(gradmedic.clip_grad_norm_([w], 1.0)) == pytest.approx(5.0)
    assert any("monitor" in str(c.message) for c in caught)
    assert w.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)


def test_reexports_adaptive_clippers():
    from gradmedic.remedies.clipping import AGC, AutoClip, ZClip

    assert (AGC, AutoClip, ZClip) == (gradmedic.AGC, gradmedic.AutoClip, gradmedic.ZClip)
    with pytest.raises(AttributeError):
        clipping.NotAClipper  # noqa: B018
