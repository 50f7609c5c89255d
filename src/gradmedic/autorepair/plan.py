"""Which candidates the repair search tries, in which order.

The ranked pool is built from the diagnosis:

1. the findings' remedy lists fused into one order (reciprocal-rank fusion
   weighted by severity: a remedy several findings propose rises), with junk
   numbers replaced (a clip threshold outside 1e-3..1e3, measured on a net that
   explodes from its first step, clips nothing useful: the conventional 1.0 is
   used instead);
2. split into *model* remedies (init, surgery) and *training* remedies (lr,
   clipping, optimizer); Adam joins the training remedies when the setup's
   optimizer is not adaptive, since a structural fix often needs a step size
   the old lr does not give (He init + batch norm under SGD at lr 1e-4);
3. triage: when the original is sick at initialization (its preflight has
   findings) the cause is structural and model remedies lead, else training
   remedies lead;
4. singles, pairs and triples, interleaved (one single, one pair, one triple,
   ...): a pair is a leading remedy with a second one from another group, a
   triple two leading remedies and a training one; within each, lower summed
   ranks first, one remedy of each group before a second variant of any.

The random pool is the whole catalog with default arguments (Kim et al., ICST
2023: a search drawing remedies at random matches AUTOTRAINER).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence

from gradmedic.autorepair.appliers import applier_for, compatible, order
from gradmedic.errors import GradmedicError
from gradmedic.findings import Finding, Remedy
from gradmedic.remedies import catalog

MAX_COMBINATION = 3
CLIP_RANGE = (1e-3, 1e3)  # absolute clip thresholds outside are no measured baseline
WIDTH = 6  # remedies of each kind that enter pairs and triples

Combo = tuple[Remedy, ...]


def key(remedy: Remedy) -> str:
    """Identity of a remedy: its name and parameters."""
    return remedy.name + json.dumps(dict(remedy.params), sort_keys=True, default=str)


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


def sane(remedy: Remedy) -> Remedy:
    """``remedy``, or the conventional clip when its threshold is no usable number."""
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


def ranked_pool(findings: Sequence[Finding], structural: bool, adaptive: bool) -> Iterator[Combo]:
    """Candidate combinations from the findings, most promising first (module docstring)."""
    remedies = _unique([sane(r) for r in fused(findings)])
    variant = variant_ranks(remedies)
    by_variant = sorted(remedies, key=lambda r: variant[key(r)])  # stable
    model = [r for r in by_variant if applier_for(r).model is not None]
    training = [r for r in by_variant if applier_for(r).model is None]
    if not adaptive and not any(r.name == "adaptive_optimizer" for r in training):
        training.append(catalog.adaptive_optimizer("the step size a structural fix may need"))
    lead, other = (model, training) if structural else (training, model)
    singles = [(r,) for r in lead + other]
    pairs = _valid(_ranked_combos([lead[:WIDTH], lead[:WIDTH] + other[:WIDTH]]))
    triples = _valid(_ranked_combos([lead[:WIDTH], lead[:WIDTH], training[:WIDTH]]))
    seen: set[frozenset[str]] = set()
    for combo in _interleave(singles, pairs, triples):
        if combo_key(combo) not in seen:
            seen.add(combo_key(combo))
            yield tuple(order(combo))


def extension(
    parent: Combo, findings: Sequence[Finding], tried: set[frozenset[str]]
) -> Combo | None:
    """``parent`` plus the first cure of its remaining findings that fits and is new."""
    if len(parent) >= MAX_COMBINATION:
        return None
    for remedy in (sane(r) for r in fused(findings)):
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


def _ranked_combos(slots: Sequence[Sequence[Remedy]]) -> list[Combo]:
    """Combinations taking one remedy per slot, by summed rank (ties: generation order)."""
    combos = []
    for n, picks in enumerate(itertools.product(*(list(enumerate(s)) for s in slots))):
        ranks = [rank for rank, _ in picks]
        combos.append((sum(ranks), n, tuple(r for _, r in picks)))
    return [c for _, _, c in sorted(combos, key=lambda t: (t[0], t[1]))]


def _valid(combos: Sequence[Combo]) -> list[Combo]:
    """Combinations of distinct, compatible remedies, each set once (first order kept)."""
    out, seen = [], set()
    for combo in combos:
        k = combo_key(combo)
        if len(k) == len(combo) and compatible(combo) and k not in seen:
            seen.add(k)
            out.append(combo)
    return out


def _interleave(*lists: Sequence[Combo]) -> Iterator[Combo]:
    for group in itertools.zip_longest(*lists):
        yield from (c for c in group if c is not None)
