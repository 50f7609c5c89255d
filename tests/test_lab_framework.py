"""The lab's framework: verdict rules, registry, runner, data, training loop, figures."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradmedic.errors import GradmedicError
from gradmedic.lab import data, plotting, runner
from gradmedic.lab.base import (
    EXPERIMENTS,
    LabConfig,
    Result,
    Verdict,
    combine,
    experiment,
    judge,
    judge_claims,
)
from gradmedic.lab.claims import CLAIMS
from gradmedic.lab.train import train


@pytest.fixture
def registered():
    """Register throwaway experiments; remove them afterwards."""
    names = []

    def add(name, fn, claims=("K1",)):
        experiment(name, list(claims), f"test {name}")(fn)
        names.append(name)

    yield add
    for n in names:
        EXPERIMENTS.pop(n, None)


def _result(name="x", verdict=Verdict.HOLDS, numbers=None, **kw):
    return Result(
        name=name,
        claims=kw.pop("claims", ["K1"]),
        title="t",
        setup="s",
        expected="e",
        numbers=numbers if numbers is not None else {"a": 1.5},
        rule="r",
        verdict=verdict,
        **kw,
    )


# --- verdict rules -------------------------------------------------------------------


def test_judge_all_some_none():
    assert judge({"a": True, "b": True}) is Verdict.HOLDS
    assert judge({"a": True, "b": False}) is Verdict.PARTLY
    assert judge({"a": False, "b": False}) is Verdict.FAILS
    with pytest.raises(ValueError, match="checks"):
        judge({})


def test_combine_and_judge_claims():
    assert combine([Verdict.HOLDS, Verdict.HOLDS]) is Verdict.HOLDS
    assert combine([Verdict.FAILS]) is Verdict.FAILS
    assert combine([Verdict.HOLDS, Verdict.FAILS]) is Verdict.PARTLY
    assert combine([Verdict.HOLDS, Verdict.ERROR]) is Verdict.ERROR
    overall, per = judge_claims({"K1": {"a": True}, "K2": {"b": False, "c": True}})
    assert per == {"K1": Verdict.HOLDS, "K2": Verdict.PARTLY}
    assert overall is Verdict.PARTLY


def test_claims_catalogue_has_the_17_claims():
    assert list(CLAIMS) == [f"K{i}" for i in range(1, 8)] + [f"R{i}" for i in range(1, 11)]
    assert all(c.text and c.seeds for c in CLAIMS.values())
    assert CLAIMS["K5"].kind == "cause" and CLAIMS["R7"].kind == "remedy"


# --- registry and runner ---------------------------------------------------------------


def test_registry_loads_every_module_and_claims_are_known():
    reg = runner.registry()
    for name in ("sigmoid_chain", "depth_profiles", "rnn_power", "layer_movement"):
        assert name in reg
    for exp in reg.values():
        assert exp.claims and set(exp.claims) <= set(CLAIMS), exp.name


def test_register_twice_from_another_module_fails(registered):
    registered("_t_dup", lambda c: None)

    def other(config):
        return None

    other.__module__ = "somewhere.else"
    with pytest.raises(ValueError, match="registered twice"):
        experiment("_t_dup", ["K1"], "again")(other)


def test_select_unknown_name_is_one_clear_error():
    with pytest.raises(GradmedicError, match=r"unknown experiment 'nope'.*known: .*rnn_power"):
        runner.select(["nope"])


def test_runner_turns_an_exception_into_a_failed_result_and_goes_on(registered):
    def boom(config):
        raise RuntimeError("kaboom 42")

    def fine(config):
        return _result("_t_fine", numbers={"x": float(torch.rand(1))})

    registered("_t_boom", boom)
    registered("_t_fine", fine)
    seen = []
    results = runner.run(["_t_boom", "_t_fine"], LabConfig(quick=True), on_done=seen.append)
    by_name = {r.name: r for r in results}
    assert by_name["_t_boom"].verdict is Verdict.ERROR
    assert "kaboom 42" in by_name["_t_boom"].error
    assert "Traceback" in by_name["_t_boom"].error
    assert by_name["_t_fine"].verdict is Verdict.HOLDS
    assert [r.name for r in seen] == [r.name for r in results]
    assert all(r.seconds >= 0 for r in results)


def test_runner_rejects_non_result_and_unserializable_numbers(registered):
    registered("_t_none", lambda c: None)
    registered("_t_obj", lambda c: _result("_t_obj", numbers={"bad": object()}))
    res = runner.run(["_t_none", "_t_obj"], LabConfig(quick=True))
    assert res[0].verdict is Verdict.ERROR and "not Result" in res[0].error
    # _plain turns unknown objects into strings: still a valid result
    assert res[1].verdict is Verdict.HOLDS


def test_runner_fixes_seeds_so_runs_repeat(registered):
    def rnd(config):
        return _result(
            "_t_rnd",
            numbers={
                "t": torch.rand(3).tolist(),
                "n": np.random.rand(2).tolist(),
                "s": config.seed,
            },
        )

    registered("_t_rnd", rnd)
    a = runner.run(["_t_rnd"], LabConfig(seed=5))[0].numbers
    torch.rand(10)  # disturb the global state in between
    b = runner.run(["_t_rnd"], LabConfig(seed=5))[0].numbers
    c = runner.run(["_t_rnd"], LabConfig(seed=6))[0].numbers
    assert a == b
    assert a["t"] != c["t"]
    torch.manual_seed(5)
    assert a["t"] == torch.rand(3).tolist()


@pytest.mark.skipif(not runner.can_fork(), reason="worker processes need fork (Linux)")
def test_workers_give_the_sequential_results_in_registry_order(registered):
    def rnd(name):
        def fn(config):
            fig, ax = plotting.figure()
            ax.plot([1, 2], [3, 4])
            numbers = {"t": torch.rand(3).tolist(), "threads": torch.get_num_threads()}
            return _result(name, numbers=numbers, figures={"f": fig})

        return fn

    def boom(config):
        raise RuntimeError("worker kaboom")

    names = ["_t_w1", "_t_w2", "_t_w3"]
    for n in names:
        registered(n, rnd(n))
    registered("_t_wboom", boom)
    seen = []
    chosen = [*names, "_t_wboom"]
    parallel = runner.run(chosen, LabConfig(seed=3), jobs=2, on_done=seen.append)
    serial = runner.run(chosen, LabConfig(seed=3), jobs=1)
    assert [r.name for r in parallel] == [r.name for r in serial] == sorted(chosen)
    for p, s in zip(parallel, serial, strict=True):
        assert p.numbers == s.numbers and p.verdict is s.verdict
    assert all(r.numbers["threads"] == 1 for r in parallel if r.name != "_t_wboom")
    # every experiment seeds itself: the worker's draw is the seeded draw
    torch.manual_seed(3)
    assert parallel[0].numbers["t"] == torch.rand(3).tolist()
    boom_result = next(r for r in parallel if r.name == "_t_wboom")
    assert boom_result.verdict is Verdict.ERROR and "worker kaboom" in boom_result.error
    assert sorted(r.name for r in seen) == sorted(chosen)  # each reported once, as it finished
    # workers send their figures back rendered, as the SVG to_svg writes for the same figure
    svg = next(r for r in parallel if r.name == "_t_w1").figures["f"]
    assert isinstance(svg, plotting.Svg) and svg == plotting.to_svg(serial[0].figures["f"])
    assert _result("x", figures={"f": svg}).to_dict()["figures"] == {}  # not a path


@pytest.mark.skipif(not runner.can_fork(), reason="worker processes need fork (Linux)")
def test_workers_start_the_longest_first(registered):
    for n in ("_t_a", "_t_b", "_t_c", "_t_d"):
        registered(n, lambda config, n=n: _result(n))
    started = []
    durations = {"_t_a": 1.0, "_t_b": 5.0, "_t_c": 3.0}  # _t_d unknown: counted as longest
    results = runner.run(
        ["_t_a", "_t_b", "_t_c", "_t_d"],
        jobs=2,
        durations=durations,
        on_start=lambda e: started.append(e.name),
    )
    assert started == ["_t_d", "_t_b", "_t_c", "_t_a"]
    assert [r.name for r in results] == ["_t_a", "_t_b", "_t_c", "_t_d"]  # registry order


def test_jobs_must_be_positive():
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        runner.run(["rnn_power"], jobs=0)


def test_runner_restores_torch_threads(registered):
    seen = {}

    def threads(config):
        seen["n"] = torch.get_num_threads()
        return _result("_t_thr")

    registered("_t_thr", threads)
    before = torch.get_num_threads()
    runner.run(["_t_thr"], threads=1)
    assert seen["n"] == 1
    assert torch.get_num_threads() == before


def test_result_dict_round_trip_through_json():
    r = _result(
        "rt",
        verdict=Verdict.PARTLY,
        numbers={"a": [1.0, 2.0], "nested": {"b": True}, "inf": math.inf},
        claims=["K1", "K2"],
        per_claim={"K1": Verdict.HOLDS, "K2": Verdict.FAILS},
        explanation="why",
        seconds=1.25,
    )
    d = json.loads(json.dumps(r.to_dict({"f": "figures/rt-f.svg"})))
    back = Result.from_dict(d)
    assert back.per_claim == r.per_claim and back.verdict is Verdict.PARTLY
    assert d["numbers"]["inf"] is None and d["nonfinite"] == {"/inf": "inf"}
    assert back.numbers == {"a": [1.0, 2.0], "nested": {"b": True}, "inf": math.inf}
    assert back.figures == {"f": "figures/rt-f.svg"}
    assert (back.seconds, back.explanation, back.claims) == (1.25, "why", ["K1", "K2"])
    assert back.claim_verdict("K2") is Verdict.FAILS
    assert back.to_dict() == d  # paths survive a second save


def test_labconfig_pick():
    assert LabConfig(quick=True).pick(1, 2) == 1
    assert LabConfig().pick(1, 2) == 2


# --- data --------------------------------------------------------------------------------


def test_digits_standardized_stratified_and_fixed_by_seed():
    ds = data.digits(seed=0)
    assert ds.name == "digits" and ds.n_features == 64 and ds.n_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == math.ceil(1797 * 0.25)
    std = ds.x_train.double().std(0, unbiased=False)
    varying = std > 0
    assert torch.allclose(
        ds.x_train.double().mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-6
    )
    assert torch.allclose(
        std[varying], torch.ones(int(varying.sum()), dtype=torch.float64), atol=1e-5
    )
    test_counts = torch.bincount(ds.y_test, minlength=10).double()
    all_counts = test_counts + torch.bincount(ds.y_train, minlength=10)
    assert torch.all((test_counts - 0.25 * all_counts).abs() <= 1)  # stratified
    again = data.digits(seed=0)
    assert torch.equal(again.y_train, ds.y_train)
    assert not torch.equal(data.digits(seed=1).y_train, ds.y_train)
    sub = ds.subset(100, 20)
    assert len(sub.x_train) == 100 and len(sub.y_test) == 20


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder, n_train=12, n_test=6, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        raw = _idx(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_reader(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)
    ds = data.mnist(tmp_path)
    assert ds.name == "mnist" and ds.n_features == 784
    x = arrays["train-images-idx3-ubyte"].reshape(12, -1).astype(np.float64)
    std = x.std(0)
    std[std == 0] = 1
    expected = (x - x.mean(0)) / std
    np.testing.assert_allclose(ds.x_train.numpy(), expected, atol=1e-5)
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.load(0, tmp_path).name == "mnist"


def test_mnist_missing_and_bad_files(tmp_path):
    with pytest.raises(GradmedicError, match="not a folder"):
        data.mnist(tmp_path / "nope")
    with pytest.raises(GradmedicError, match=r"train-images-idx3-ubyte\[\.gz\] not found"):
        data.mnist(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_mnist(bad, gz=False)
    (bad / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(GradmedicError, match="bad magic"):
        data.mnist(bad)
    short = tmp_path / "short"
    short.mkdir()
    _write_mnist(short, gz=False)
    (short / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(5)))  # 5 labels, 6 images
    with pytest.raises(GradmedicError, match="6 images but 5 labels"):
        data.mnist(short)
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    _write_mnist(trunc, gz=False)
    raw = (trunc / "train-images-idx3-ubyte").read_bytes()
    (trunc / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(GradmedicError, match="expected"):
        data.mnist(trunc)


# --- training loop and figures ----------------------------------------------------------


def test_train_learns_digits_and_is_reproducible():
    ds = data.digits(0).subset(400, 200)

    def once():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        grads = []
        curves = train(model, ds, opt, steps=60, batch_size=32, eval_every=30, on_step=grads.append)
        return model, curves, grads

    model, curves, grads = once()
    assert len(curves.loss) == len(curves.grad_norm) == len(curves.param_norm) == 60
    assert grads == list(range(60))
    assert [s for s, _ in curves.test_accuracy] == [30, 60]
    assert curves.loss[-1] < 0.6 * curves.loss[0]
    manual = float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())
    assert curves.param_norm[-1] == pytest.approx(manual, rel=1e-6)
    with torch.no_grad():
        acc = float((model(ds.x_test).argmax(1) == ds.y_test).float().mean())
    assert curves.final_accuracy == pytest.approx(acc)
    _, again, _ = once()
    assert again.loss == curves.loss


def test_train_stops_on_nonfinite_loss_and_validates():
    ds = data.digits(0).subset(64, 16)
    model = nn.Linear(64, 10)
    with torch.no_grad():
        model.weight.fill_(math.inf)
    curves = train(model, ds, torch.optim.SGD(model.parameters(), lr=0.1), steps=5)
    assert curves.diverged and len(curves.loss) == 1
    with pytest.raises(ValueError, match="steps"):
        train(model, ds, torch.optim.SGD(model.parameters(), lr=0.1), steps=0)


def test_svg_is_deterministic_and_log_profile_drops_nonpositive():
    def make():
        fig, ax = plotting.figure()
        plotting.profile(ax, [1, 2, 3, 4], [1.0, 0.0, float("nan"), 1e-3], label="m")
        plotting.label(ax, "t", "x", "y")
        return fig, ax

    fig, ax = make()
    assert ax.get_yscale() == "log"
    assert ax.lines[0].get_xdata().tolist() == [1.0, 4.0]
    svg = plotting.to_svg(fig)
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert plotting.to_svg(make()[0]) == svg
    assert len(plotting.layer_colors(5)) == 5


def test_a_module_that_fails_to_import_becomes_a_failed_result(tmp_path, monkeypatch):
    import gradmedic.lab.experiments as pkg

    (tmp_path / "broken_exp_for_test.py").write_text("raise ImportError('missing thing 7')\n")
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    failures = pkg.load_all()
    assert "missing thing 7" in failures["broken_exp_for_test"]
    monkeypatch.setattr(runner, "select", lambda names: [])
    results = runner.run(None, LabConfig(quick=True))
    assert [r.name for r in results] == ["broken_exp_for_test"]
    assert results[0].verdict is Verdict.ERROR and "missing thing 7" in results[0].error
    monkeypatch.undo()
    assert "broken_exp_for_test" not in pkg.load_all()


def test_inconclusive_is_left_out_of_a_combination_unless_alone():
    from gradmedic.lab.base import combine

    assert combine([Verdict.HOLDS, Verdict.INCONCLUSIVE]) is Verdict.HOLDS
    assert combine([Verdict.FAILS, Verdict.INCONCLUSIVE]) is Verdict.FAILS
    assert combine([Verdict.INCONCLUSIVE, Verdict.INCONCLUSIVE]) is Verdict.INCONCLUSIVE
    assert combine([Verdict.INCONCLUSIVE, Verdict.ERROR]) is Verdict.ERROR
    assert combine([Verdict.HOLDS, Verdict.FAILS, Verdict.INCONCLUSIVE]) is Verdict.PARTLY


def test_odd_keys_finds_dots_and_slashes_outside_checks():
    from gradmedic.lab.base import odd_keys

    numbers = {"runs": {"relu/sgd": 1, "ok": [{"lr 0.1": 2}]}, "checks": {"a. b/c": True}}
    assert odd_keys(numbers) == ["/runs/relu/sgd", "/runs/ok/lr 0.1"]
    assert odd_keys({"decay_1e-3": {"mean": 1.0}}) == []
