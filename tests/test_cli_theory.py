import json
import math

from typer.testing import CliRunner

from gradmedic.cli.app import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["theory", *args])


def test_theory_table_for_chaotic_tanh():
    result = _run("--activation", "tanh", "--sigma-w", "1.5", "--depth", "50")
    assert result.exit_code == 0, result.output
    out = result.output
    for label in ("q*", "chi", "gain per layer", "xi_grad", "xi_q", "xi_c", "input/output ratio"):
        assert label in out
    assert "verdict: chaotic phase" in out
    assert "explode" in out


def test_theory_json_has_the_closed_form_numbers():
    result = _run("--activation", "relu", "--sigma-w", "1.2", "--depth", "10", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert math.isclose(data["chi"], 1.2**2 / 2, rel_tol=1e-13)
    assert math.isclose(data["gain_per_layer"], 1.2 / math.sqrt(2), rel_tol=1e-12)
    assert math.isclose(data["xi_grad"], 1 / abs(math.log(0.72)), rel_tol=1e-9)
    assert math.isclose(data["ratio"], 0.72**5, rel_tol=1e-9)  # ReLU: chi(q) is the same at every q
    assert data["q_star"] == 0.0 and data["fixed_point_kind"] == "zero"
    assert data["phase"] == "ordered"


def test_theory_critical_and_activation_parameters():
    data = json.loads(_run("-a", "tanh", "--sigma-w", "1", "--json").output)
    assert data["phase"] == "critical"
    assert data["xi_grad"] == "inf"  # non-finite numbers are strings in JSON
    data = json.loads(_run("-a", "leaky_relu", "--slope", "0.5", "--sigma-w", "1", "--json").output)
    assert math.isclose(data["chi"], (1 + 0.25) / 2, rel_tol=1e-12)
    data = json.loads(_run("-a", "relu", "--sigma-w", "1.5", "--sigma-b", "0.2", "--json").output)
    assert data["q_star"] == "inf" and data["phase"] == "chaotic"


def test_theory_bad_input_is_one_line_without_traceback():
    for args, text in [
        (["-a", "swishy"], "unknown activation 'swishy'"),
        (["--sigma-w", "-1"], "sigma_w must be a finite number > 0"),
        (["--sigma-b", "-0.5"], "sigma_b must be a finite number >= 0"),
        (["--depth", "0"], "depth must be an integer >= 1"),
        (["-a", "relu", "--slope", "0.1"], "does not take parameters"),
    ]:
        result = _run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert text in result.output
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
