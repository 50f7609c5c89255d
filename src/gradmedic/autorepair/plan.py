"""Which candidates the repair search tries, in which order.

The ranked pool is built from the diagnosis:

1. the findings' remedy lists fused into one order (reciprocal-rank fusion
   weighted by severity: a remedy several findings propose rises), with numbers
   a trial run can judge (:func:`sane`: a clip threshold outside 1e-3..1e3,
   measured on a net that explodes from its first step, becomes the
   conventional 1.0; a warmup longer than half the trial run is cut to half);
2. split into *model* remedies (init, surgery) and *training* remedies (lr,
   clipping, optimizer); each proposed model remedy is followed by its *kin*,
   the norm-preserving alternatives no detector names (LSUV and, for tanh and
   linear nets, orthogonal init beside a proposed init; ELU beside a proposed
   ReLU; see :func:`_with_kin`); Adam joins the training remedies when the
   setup's optimizer is not adaptive, beside the record-sized lr change: the
   two ways of fixing a step size (resize it, or make it scale-free);
3. triage: when the original is sick at initialization (its preflight has
   findings) the cause is structural and model remedies lead, each tried under
   Adam first and then under the user's own optimizer (a structural fix often
   needs a step size the old lr does not give: He init + batch norm under SGD
   at lr 1e-4); else training remedies lead, alone first, then with a model
   remedy;
4. a candidate is a part of each axis (nothing, one remedy, or a compatible
   pair; at most three remedies in all), ranked by the sum of its members'
   positions, the leading axis' position breaking ties.

The random pool is the whole catalog with default arguments (Kim et al., ICST
2023: a search drawing remedies at random matches AUTOTRAINER).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Collection, Iterator, Sequence

from gradmedic.autorepair.appliers import applier_for, compatible, order
from gradmedic.errors import GradmedicError
from gradmedic.findings import Finding, Remedy
from gradmedic.remedies import catalog

MAX_COMBINATION = 3
CLIP_RANGE = (1e-3, 1e3)  # absolute clip thresholds outside are no measured baseline
WIDTH = 6  # remedies of each kind that enter pairs and triples

Combo = tuple[Remedy, ...]


def key(remedy: Remedy) -> str:
    """Identity of a remedy: its name and the parameters that decide what it does.

    An lr change's ``lr`` (the rate it comes to) is information, not a setting:
    ``lower_lr(0.1)`` proposed by two runs at different lrs is one remedy.
    """
    params = {
        k: v for k, v in remedy.params.items() if not (k == "lr" and remedy.name in _LR_CHANGES)
    }
    return remedy.name + json.dumps(params, sort_keys=True, default=str)


_LR_CHANGES = frozenset({"lower_lr", "raise_lr"})


def combo_key(combo: Sequence[Remedy]) -> frozenset[str]:
    """Identity of a combination (order-free)."""
    return frozenset(map(key, combo))


def fused(findings: Sequence[Finding]) -> list[Remedy]:
    """All findings' remedies in one order: score = sum of severity weight / (rank + 1)."""
    score: dict[str, float] = {}
    first: dict[str, Remedy] = {}
    for finding in findings:
        weight = 1 + finding.severity.rank
        for rank, remedy in enumerate(finding.remedies):
            try:
                applier_for(remedy)
            except GradmedicError:
                continue  # a remedy the search cannot apply (reported nowhere else)
            k = key(remedy)
            score[k] = score.get(k, 0.0) + weight / (rank + 1)
            first.setdefault(k, remedy)
    keys = sorted(first, key=lambda k: -score[k])  # stable: ties keep first appearance
    return [first[k] for k in keys]


def sane(remedy: Remedy, steps: int | None = None) -> Remedy:
    """``remedy`` with numbers a trial run of ``steps`` steps can judge.

    A clip threshold that is no usable number becomes the conventional 1.0; a
    warmup longer than half the trial run is cut to half of it, so that the run
    trains at the target lr for its second half (a warmup that never ends in
    the trial would be judged at a fraction of the lr it recommends).
    """
    if remedy.name == "warmup" and steps is not None and int(remedy.params["steps"]) > steps // 2:
        half = max(1, steps // 2)
        why = f"the proposed {remedy.params['steps']} steps cut to half the {steps}-step trial"
        return catalog.warmup(float(remedy.params["start_factor"]), half, why)
    if remedy.name in ("clip_norm", "clip_value"):
        value = float(next(iter(remedy.params.values())))
        low, high = CLIP_RANGE
        if not low <= value <= high:
            why = (
                f"the measured threshold {value:.3g} is outside {low:g}..{high:g}: the norms it "
                "came from were already exploding; 1.0 is the usual starting point"
            )
            return catalog.clip_norm(1.0, why)
    return remedy


def variant_ranks(remedies: Sequence[Remedy]) -> dict[str, int]:
    """For each remedy, how many of its group (e.g. other clip thresholds) come before it."""
    count: dict[str, int] = {}
    ranks = {}
    for remedy in remedies:
        group = applier_for(remedy).group
        ranks[key(remedy)] = count.get(group, 0)
        count[group] = count.get(group, 0) + 1
    return ranks


def ranked_pool(
    findings: Sequence[Finding],
    structural: bool,
    adaptive: bool,
    activations: Collection[str] = (),
    steps: int | None = None,
) -> Iterator[Combo]:
    """Candidate combinations from the findings, most promising first (module docstring).

    Args:
        findings: The original run's and its preflight's findings.
        structural: The preflight has findings (model remedies lead).
        adaptive: The setup's optimizer is already adaptive (no Adam added).
        activations: Class names of the model's modules (``"Tanh"``, ``"RNN"``...),
            which decide the kin remedies (orthogonal init for tanh and linear nets).
        steps: The length of a full trial run (sizes a warmup, see :func:`sane`).
    """
    remedies = _unique([sane(r, steps) for r in fused(findings)])
    variant = variant_ranks(remedies)
    by_variant = sorted(remedies, key=lambda r: variant[key(r)])  # stable
    model = _with_kin(
        [r for r in by_variant if applier_for(r).model is not None], findings, set(activations)
    )
    training = [r for r in by_variant if applier_for(r).model is None]
    adam = next((r for r in training if r.name == "adaptive_optimizer"), None)
    if adam is None and not adaptive:
        adam = catalog.adaptive_optimizer("a step that does not scale with the gradient")
    if adam is not None:  # the scale-free step beside the record-sized lr change
        training = [r for r in training if r is not adam]
        training.insert(0 if structural else min(1, len(training)), adam)
    if structural:
        lead = _parts([*model, None])
        # a structural fix under a step size that lets it learn: Adam before the user's own
        other = _parts([*training[:1], None, *training[1:]] if adam else [None, *training])
    else:
        lead, other = _parts([*training, None]), _parts([None, *model])
    combos: list[tuple[int, int, int, Combo]] = []
    for (ra, a), (rb, b) in itertools.product(lead, other):
        combo = (*a, *b)
        if combo and len(combo) <= MAX_COMBINATION and compatible(combo):
            combos.append((ra + rb, ra, len(combos), combo))
    seen: set[frozenset[str]] = set()
    for *_, combo in sorted(combos, key=lambda t: t[:3]):
        if combo_key(combo) not in seen:
            seen.add(combo_key(combo))
            yield tuple(order(combo))


# Norm-preserving alternatives to a proposed remedy, tried beside it.
_ODD = frozenset({"Tanh", "Identity", "Hardtanh", "Softsign"})  # odd, slope 1 at 0
_RELU = frozenset({"ReLU", "LeakyReLU"})
_RECURRENT = frozenset({"RNN"})
_GROWING = frozenset({"exploding", "exploding_in_time", "unstable_updates", "nonfinite"})


def _with_kin(
    model: Sequence[Remedy], findings: Sequence[Finding], activations: set[str]
) -> list[Remedy]:
    """``model`` remedies with the kin of each, placed right after it.

    - a proposed initialization: LSUV (Mishkin & Matas 2016: measures each layer's
      output variance on a batch, so it fits any activation and depth), and
      orthogonal init in a net whose activations are odd with slope 1 at 0 (tanh,
      linear) or a plain RNN: every singular value 1, under which such a deep
      Jacobian can stay close to an isometry (Saxe et al. 2014, Pennington et al.
      2017);
    - a proposed swap to ReLU or Leaky ReLU: ELU (Clevert et al. 2016: slope > 0
      below 0 and mean output near 0); and, when a ReLU net vanishes or has dead
      units and no swap was proposed, ReLU -> ELU after the first initialization;
    - a plain RNN whose updates or gradients grow, with no initialization proposed:
      orthogonal init first (K5: the gradient through time is multiplied by W_h at
      every step; orthogonal W_h has every singular value at 1).
    """
    out = list(model)
    swaps = [r for r in model if applier_for(r).group == "activation"]
    inits = [r for r in model if applier_for(r).group == "init"]
    problems = {f.problem.value for f in findings}
    if not inits and activations & _RECURRENT and problems & _GROWING:
        inits = [catalog.init_scheme("orthogonal", "all singular values of W_h at 1")]
        out.insert(0, inits[0])
    if not swaps and activations & _RELU and problems & {"vanishing", "dead_units"} and inits:
        old = "ReLU" if "ReLU" in activations else "LeakyReLU"
        out.insert(out.index(inits[0]) + 1, catalog.swap_activation(old, "ELU", _KIN))
    for swap in swaps:
        mapping = dict(swap.params.get("mapping", {}))
        if set(mapping.values()) & _RELU:
            old = next(iter(mapping), "ReLU")
            out.insert(out.index(swap) + 1, catalog.swap_activation(old, "ELU", _KIN))
    if inits:
        kin = [catalog.init_scheme("lsuv", _KIN)]
        if activations and (activations & (_ODD | _RECURRENT)) and not activations & _RELU:
            kin.append(catalog.init_scheme("orthogonal", _KIN))
        at = out.index(inits[0]) + 1
        out[at:at] = [k for k in kin if all(key(k) != key(r) for r in out)]
    return _unique(out)


_KIN = "a norm-preserving alternative to the proposed remedy"


def _parts(options: Sequence[Remedy | None]) -> list[tuple[int, Combo]]:
    """``(rank, combo)`` for one axis: each option (None: nothing) and compatible pairs.

    A single's rank is its position, a pair's the sum of its members' positions.
    """
    parts: list[tuple[int, Combo]] = [(i, () if r is None else (r,)) for i, r in enumerate(options)]
    real = [(i, r) for i, r in enumerate(options) if r is not None][:WIDTH]
    for (i, a), (j, b) in itertools.combinations(real, 2):
        if key(a) != key(b) and compatible((a, b)):
            parts.append((i + j, (a, b)))
    return parts


def extension(
    parent: Combo, findings: Sequence[Finding], tried: set[frozenset[str]], steps: int | None = None
) -> Combo | None:
    """``parent`` plus the first cure of its remaining findings that fits and is new."""
    if len(parent) >= MAX_COMBINATION:
        return None
    for remedy in (sane(r, steps) for r in fused(findings)):
        child = (*parent, remedy)
        if compatible(child) and combo_key(child) not in tried:
            return tuple(order(child))
    return None


def whole_catalog_extra(steps: int) -> list[Remedy]:
    """Catalog remedies beyond :func:`~gradmedic.autorepair.appliers.whole_catalog`'s."""
    return [catalog.raise_lr(10.0), catalog.warmup(0.1, max(1, steps // 10))]


def _unique(remedies: Sequence[Remedy]) -> list[Remedy]:
    seen: dict[str, Remedy] = {}
    for r in remedies:
        seen.setdefault(key(r), r)
    return list(seen.values())
