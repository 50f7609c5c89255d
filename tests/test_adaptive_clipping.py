import math

import pytest
import torch

import gradmedic


def _param_with_norm(norm):
    """A parameter whose gradient is (0.6, 0.8) * norm, so its L2 norm is exactly ``norm``."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = torch.tensor([0.6, 0.8], dtype=torch.float64) * norm
    return p


def _run(clipper, norms):
    """Feed a sequence of gradient norms; return (returned totals, norms after clipping)."""
    totals, after = [], []
    for n in norms:
        p = _param_with_norm(n)
        totals.append(float(clipper([p])))
        after.append(float(p.grad.norm()))
    return totals, after


# --- AutoClip ----------------------------------------------------------------------


def test_autoclip_percentile_of_history_including_current():
    clipper = gradmedic.AutoClip(percentile=50)
    totals, after = _run(clipper, [5.0, 1.0, 3.0, 10.0])
    assert totals == pytest.approx([5.0, 1.0, 3.0, 10.0])
    # step 4: sorted history (1, 3, 5, 10), 50th percentile at rank 1.5 -> 3 + 0.5 * 2 = 4
    assert after[3] == pytest.approx(10.0 * 4.0 / (10.0 + 1e-6), rel=1e-9)
    # steps 2-3 are at or under the median of the history seen so far: unchanged up to 1e-6
    assert after[1] == pytest.approx(1.0)
    assert after[2] == pytest.approx(3.0, rel=1e-6)
    assert float(clipper.threshold) == pytest.approx(4.0)
    assert clipper.history().tolist() == pytest.approx([5.0, 1.0, 3.0, 10.0])


def test_autoclip_low_percentile_and_ring_buffer():
    tenth = gradmedic.AutoClip(percentile=10)
    _, after = _run(tenth, [5.0, 1.0, 3.0, 10.0])
    # rank 0.1 * 3 = 0.3 between 1 and 3 -> 1.6
    assert after[3] == pytest.approx(10.0 * 1.6 / (10.0 + 1e-6), rel=1e-9)

    ring = gradmedic.AutoClip(percentile=50, history_size=2)
    _, after = _run(ring, [5.0, 1.0, 3.0, 10.0])
    assert ring.history().tolist() == pytest.approx([3.0, 10.0])
    assert after[3] == pytest.approx(10.0 * 6.5 / (10.0 + 1e-6), rel=1e-9)


@pytest.mark.parametrize("history_size", [None, 3])
def test_autoclip_state_dict_round_trip(history_size):
    a = gradmedic.AutoClip(percentile=30, history_size=history_size)
    _run(a, [4.0, 8.0, 1.0, 7.0, 2.0])
    b = gradmedic.AutoClip()
    b.load_state_dict(a.state_dict())
    assert b.history().tolist() == a.history().tolist()
    _, after_a = _run(a, [9.0, 6.0])
    _, after_b = _run(b, [9.0, 6.0])
    assert after_a == after_b
    assert b.steps == 7


def test_autoclip_nan_norm_is_stored_as_inf():
    clipper = gradmedic.AutoClip(percentile=0)
    _run(clipper, [2.0])
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([float("nan"), 1.0])
    clipper([p])
    assert clipper.history().tolist() == pytest.approx([2.0, math.inf])
    _, after = _run(clipper, [3.0])
    assert after[0] == pytest.approx(2.0 * 3.0 / (3.0 + 1e-6) * 1.0, rel=1e-6)


def test_autoclip_rejects_bad_settings():
    with pytest.raises(ValueError, match="percentile"):
        gradmedic.AutoClip(percentile=120)
    with pytest.raises(ValueError, match="history_size"):
        gradmedic.AutoClip(history_size=0)


# --- AGC -----------------------------------------------------------------------------


def test_agc_unitwise_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1e-4]]))  # row norms 5, 1e-4
    w.grad = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # row norms 1, sqrt(0.5)
    b = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5 (one unit)
    b.grad = torch.tensor([0.6, 0.8])  # norm 1
    s = torch.nn.Parameter(torch.tensor([10.0, 0.0]))  # norm 10
    s.grad = torch.tensor([0.3, 0.4])  # norm 0.5 < 0.1 * 10: untouched
    total = gradmedic.AGC(clipping=0.1, eps=1e-3)([w, b, s])
    assert float(total) == pytest.approx(math.sqrt(1 + 0.5 + 1 + 0.25))
    # row 0: max 0.1 * 5 = 0.5 < 1 -> scaled by 0.5
    assert w.grad[0].tolist() == pytest.approx([0.5, 0.0])
    # row 1: weight norm floored at eps: max 0.1 * 1e-3 = 1e-4, scaled by 1e-4 / sqrt(0.5)
    k = 1e-4 / math.sqrt(0.5)
    assert w.grad[1].tolist() == pytest.approx([0.5 * k, 0.5 * k], rel=1e-5)
    assert b.grad.tolist() == pytest.approx([0.3, 0.4], rel=1e-6)
    assert s.grad.tolist() == pytest.approx([0.3, 0.4])


def test_agc_conv_weight_units_are_output_channels():
    w = torch.nn.Parameter(torch.ones(2, 1, 2, 2))  # each output channel has norm 2
    g = torch.zeros(2, 1, 2, 2)
    g[0] = 0.1  # channel 0 grad norm 0.2 <= 0.5 * 2: kept
    g[1, 0, 0, 0] = 3.0  # channel 1 grad norm 3 > 1: scaled to norm 1
    w.grad = g.clone()
    gradmedic.AGC(clipping=0.5)([w])
    assert torch.allclose(w.grad[0], g[0])
    assert float(w.grad[1].norm()) == pytest.approx(1.0, rel=1e-6)
    assert float(w.grad[1, 0, 0, 0]) == pytest.approx(1.0, rel=1e-6)


def test_agc_state_and_validation():
    agc = gradmedic.AGC(clipping=0.02, eps=1e-2)
    other = gradmedic.AGC()
    other.load_state_dict(agc.state_dict())
    assert (other.clipping, other.eps) == (0.02, 1e-2)
    with pytest.raises(ValueError, match="clipping"):
        gradmedic.AGC(clipping=0)


# --- ZClip ---------------------------------------------------------------------------


def _zclip_expected(norms, warmup, alpha, z_thresh, mode, eps=1e-6):
    """The ZClip recursion written out with Python floats."""
    buf, mean, var, out = [], None, None, []
    for g in norms:
        if mean is None:
            buf.append(g)
            if len(buf) == warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            out.append(g)
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + eps)
        bound = {
            "reciprocal": mean + z_thresh**2 / z * std if z > 0 else None,
            "zscore": mean + z_thresh * std,
            "mean": mean,
        }[mode]
        x = bound if z > z_thresh else g
        out.append(g * x / (g + 1e-6) if z > z_thresh else g)
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return out, mean, var


@pytest.mark.parametrize("mode", ["reciprocal", "zscore", "mean"])
def test_zclip_by_hand(mode):
    norms = [1.0, 2.0, 3.0, 2.5, 10.0, 2.0, 30.0]
    clipper = gradmedic.ZClip(alpha=0.9, z_thresh=2.5, warmup_steps=3, clip_mode=mode)
    totals, after = _run(clipper, norms)
    want, mean, var = _zclip_expected(norms, 3, 0.9, 2.5, mode)
    assert totals == pytest.approx(norms)
    assert after == pytest.approx(want, rel=1e-9)
    assert after[4] < 9.0 and after[6] < 20.0  # the two spikes were cut
    assert float(clipper.mean) == pytest.approx(mean, rel=1e-9)
    assert float(clipper.var) == pytest.approx(var, rel=1e-9)


def test_zclip_warmup_numbers_and_first_clip_by_hand():
    # warmup 1, 2, 3: mean 2, population variance 2/3; then g = 10 with z_thresh 2:
    # z = 8 / sqrt(2/3) = 9.798; reciprocal bound = 2 + 4 / z * sqrt(2/3) = 2 + 4 * (2/3) / 8
    clipper = gradmedic.ZClip(alpha=0.5, z_thresh=2.0, warmup_steps=3)
    _, after = _run(clipper, [1.0, 2.0, 3.0, 10.0])
    assert after[:3] == pytest.approx([1.0, 2.0, 3.0])
    bound = 2.0 + 4.0 * (2.0 / 3.0) / 8.0
    assert after[3] == pytest.approx(bound, rel=1e-6)
    assert float(clipper.mean) == pytest.approx(0.5 * 2.0 + 0.5 * bound, rel=1e-6)


def test_zclip_max_norm_caps_warmup_and_nonfinite_keeps_stats():
    clipper = gradmedic.ZClip(warmup_steps=2, max_norm=1.5)
    _, after = _run(clipper, [1.0, 3.0])
    assert after == pytest.approx([1.0, 1.5 * 3.0 / (3.0 + 1e-6)], rel=1e-9)
    mean, var = float(clipper.mean), float(clipper.var)
    assert (mean, var) == pytest.approx((2.0, 1.0))
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([float("nan"), 1.0])
    clipper([p])
    assert (float(clipper.mean), float(clipper.var)) == (mean, var)


def test_zclip_state_dict_round_trip():
    a = gradmedic.ZClip(warmup_steps=2, alpha=0.8)
    _run(a, [1.0, 2.0, 1.5])
    b = gradmedic.ZClip()
    b.load_state_dict(a.state_dict())
    assert _run(a, [9.0, 1.0]) == _run(b, [9.0, 1.0])
    mid = gradmedic.ZClip(warmup_steps=5)
    _run(mid, [1.0, 2.0])
    c = gradmedic.ZClip()
    c.load_state_dict(mid.state_dict())
    assert not c.initialized and len(c.state_dict()["warmup"]) == 2


def test_zclip_rejects_bad_settings():
    with pytest.raises(ValueError, match="clip_mode"):
        gradmedic.ZClip(clip_mode="fixed")
    with pytest.raises(ValueError, match="alpha"):
        gradmedic.ZClip(alpha=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        gradmedic.ZClip(warmup_steps=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adaptive_clippers_accept_half_precision(dtype):
    layer = torch.nn.Linear(4, 3).to(dtype)
    layer(torch.randn(5, 4, dtype=dtype)).sum().backward()
    grads = [p.grad.float().clone() for p in layer.parameters()]
    want = math.sqrt(sum(float(g.norm()) ** 2 for g in grads))
    for clipper in (gradmedic.AutoClip(), gradmedic.AGC(), gradmedic.ZClip()):
        for p, g in zip(layer.parameters(), grads, strict=True):
            p.grad = g.to(dtype)
        total = clipper(layer.parameters())
        assert total.dtype == torch.float32
        assert float(total) == pytest.approx(want, rel=1e-5)
        assert all(p.grad.dtype == dtype for p in layer.parameters())
