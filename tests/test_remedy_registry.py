"""The remedy registry: one kind per remedy, read by the catalog, the repair search, the
snippet writer, the CLI and the docs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gradmedic.autorepair import appliers
from gradmedic.autorepair.snippet import snippet
from gradmedic.cli.app import app
from gradmedic.errors import GradmedicError
from gradmedic.findings import Remedy
from gradmedic.remedies import base, catalog, registry
from gradmedic.remedies.base import NotApplicable, RemedyKind, TrainSettings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "remedies.md"


class ScaleWeights(RemedyKind):
    """A toy model remedy: multiply every Linear weight by ``factor``; needs a Linear."""

    name, pattern = "scale_weights", r"scale_weights_\w+"
    stage, group, where = 7, "scale", "model"
    needs = (nn.Linear,)

    def remedy(self, factor: float, why: str = "") -> Remedy:
        return self.build(
            f"Scale weights by {factor:g}",
            why,
            f"toy.scale_(model, {factor:g})",
            name=f"scale_weights_{str(factor).replace('.', 'p')}",
            factor=factor,
        )

    def apply(self, model: nn.Module, remedy: Remedy, batch: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(remedy.params["factor"])
        return model

    def defaults(self, model: nn.Module) -> list[Remedy]:
        return [self.remedy(0.5)]


class HalveLR(RemedyKind):
    """A toy training remedy: an lr factor through the default ``configure``; builds a helper
    before the loop like AutoClip does."""

    name, stage, group, where = "halve_lr", 11, "lr", "loop"
    setting = ("lr_factor", "factor")

    def remedy(self, why: str = "") -> Remedy:
        return self.build("Halve the lr", why, "h = toy.Halver(); h(optimizer)", factor=0.5)

    def lines(self, remedy: Remedy) -> list[tuple[str, str]]:
        first, second = base.statements(remedy.call)
        return [("setup", first), ("loop", second)]


@pytest.fixture
def toys():
    kinds = registry.register(ScaleWeights()), registry.register(HalveLR())
    yield kinds
    for kind in kinds:
        registry.unregister(kind.name)


def test_a_registered_model_remedy_flows_through_apply_order_and_snippet(toys):
    scale, _ = toys
    remedy = scale.remedy(0.5)
    assert remedy.name == "scale_weights_0p5" and registry.kind_of(remedy) is scale
    # he (stage 4) runs before the toy (stage 7), whatever order they are given in
    assert [r.name for r in appliers.order([remedy, catalog.init_scheme("he")])] == [
        "he_init",
        remedy.name,
    ]
    # the toy scales He's weights: exactly half a He draw from the same seeds
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    torch.manual_seed(1)
    appliers.apply_model(ref, [catalog.init_scheme("he")], torch.randn(2, 3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    torch.manual_seed(1)
    out = appliers.apply_model(model, [remedy, catalog.init_scheme("he")], torch.randn(2, 3))
    torch.testing.assert_close(out[0].weight, 0.5 * ref[0].weight, rtol=0, atol=0)
    assert snippet([remedy]) == (
        "import gradmedic\n\n# after building the model (before creating the optimizer):\n"
        "toy.scale_(model, 0.5)"
    )
    applier = appliers.applier_for(remedy)
    assert (applier.stage, applier.group, applier.where) == (7, "scale", "model")
    assert applier.model is not None and applier.settings is None
    # its `needs` is checked by apply, by the pool and by Applier.applicable
    rnn = nn.Sequential(nn.RNN(2, 2))
    with pytest.raises(NotApplicable, match="scale_weights needs a Linear module"):
        appliers.apply_model(rnn, [remedy], torch.randn(1, 2, 2))
    assert not applier.applicable(rnn)
    assert remedy.name not in {r.name for r in appliers.whole_catalog(rnn)}
    assert remedy.name in {r.name for r in appliers.whole_catalog(model)}


def test_a_registered_training_remedy_sets_settings_and_places_its_lines(toys):
    _, halve = toys
    remedy = halve.remedy()
    settings = appliers.settings_for([remedy, catalog.clip_norm(2.0)])
    assert settings == TrainSettings(clip_norm=2.0, lr_factor=0.5)
    assert appliers.applier_for(remedy).settings is not None
    # same group as lower_lr: the two exclude each other; and Adam excludes both
    assert not appliers.compatible([remedy, catalog.lower_lr(0.1)])
    assert not appliers.compatible([remedy, catalog.adaptive_optimizer()])
    text = snippet([catalog.clip_norm(1.0), remedy])
    optimizer_block, loop_block = text.split("\n\n")[1:]
    assert optimizer_block.splitlines()[1:] == ["h = toy.Halver()"]
    assert loop_block.splitlines()[1:] == [
        "h(optimizer)",
        "gradmedic.clip_grad_norm_(model.parameters(), max_norm=1)",
    ]


def test_registering_a_name_twice_is_refused(toys):
    with pytest.raises(GradmedicError, match="'halve_lr' is registered already"):
        registry.register(HalveLR())


def test_each_builtin_remedy_name_belongs_to_exactly_one_kind():
    model = nn.Sequential(nn.RNN(2, 3), nn.LSTM(3, 3), nn.Sigmoid(), nn.Tanh(), nn.Linear(3, 1))
    pool = [*appliers.whole_catalog(model), catalog.raise_lr(10.0), catalog.warmup(0.1, 5)]
    pool.append(catalog.loss_scaling(device="cpu"))  # never in the search: it needs float16
    for remedy in pool:
        owners = [k.name for k in registry.kinds() if k.owns(remedy.name)]
        assert len(owners) == 1, (remedy.name, owners)
    # every kind is represented by a default, the two budget-sized lr kinds or loss scaling
    assert {registry.kind_of(r).name for r in pool} == {k.name for k in registry.kinds()}


def test_the_catalog_constructors_are_the_registered_kinds():
    for kind in registry.kinds():
        constructor = getattr(catalog, kind.name, None)
        if constructor is not None:  # swap_activation, init_scheme... by the kind's name
            assert constructor.__self__ is kind
    assert catalog.clip_norm.__self__ is registry.get("clip_norm")
    assert appliers.NotApplicable is NotApplicable and appliers.TrainSettings is TrainSettings


def test_a_settings_kind_converts_its_param_to_the_field_type():
    s = appliers.settings_for([Remedy("truncate_bptt", "", "", {"steps": 7.0})])
    assert s.truncate_bptt == 7 and isinstance(s.truncate_bptt, int)
    assert dataclasses.replace(s, truncate_bptt=None) == TrainSettings()


def test_docs_table_names_every_registered_kind():
    text = DOCS.read_text(encoding="utf-8")
    table = text[text.index("## The registry") :]
    rows = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    assert sorted(rows) == sorted(k.name for k in registry.kinds())


def test_cli_lists_the_registry_in_stage_order():
    result = CliRunner().invoke(app, ["remedies", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert sorted(r["name"] for r in rows) == sorted(k.name for k in registry.kinds())
    stages = [r["stage"] for r in rows]
    assert stages == sorted(stages) and rows[0]["name"] == "gate_recurrent"
    assert next(r for r in rows if r["name"] == "forget_bias")["needs"] == ["LSTM"]


def test_applicability_reads_the_model_and_the_optimizer():
    mlp = nn.Sequential(nn.Linear(2, 2))
    adam = registry.get("adaptive_optimizer")
    adam.check(mlp, torch.optim.SGD(mlp.parameters(), lr=0.1))  # SGD -> Adam: fits
    with pytest.raises(NotApplicable, match="already uses AdamW; lower its learning rate"):
        adam.check(mlp, torch.optim.AdamW(mlp.parameters()))
    with pytest.raises(NotApplicable, match="gate_recurrent needs a RNN module"):
        registry.get("gate_recurrent").check(mlp)
    registry.get("gate_recurrent").check(nn.Sequential(nn.RNN(2, 2)))
