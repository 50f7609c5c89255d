"""The root-cause chain: which problem led to which, first cause first.

Non-finite values during training are the end of a story whose beginning is
usually recorded: a gradient that explodes through depth or time, or steps too
large for the weights (update ratios, a rising loss), inflate weights and
gradients until they overflow. Oversized steps also inflate the weights until the
gradient grows geometrically through depth, and push ReLU biases negative until
units die and layers receive no gradient (R3). Huge gradients make huge updates.

A finding is linked to the earliest finding among its possible causes
(:data:`CAUSES`) whose episode began before it (at the same step for a
non-finite value: the record that overflowed is the one that exploded). The chain
is every finding so linked, ordered by onset; at the same step a gradient
explosion (measured before any update was applied) comes before the update-size
evidence it makes large.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradmedic.findings import ChainLink, Finding, Problem

E, ET, U, DV = (
    Problem.EXPLODING,
    Problem.EXPLODING_IN_TIME,
    Problem.UNSTABLE_UPDATES,
    Problem.DIVERGENCE,
)
STEP_SIZE = (U, DV)

CAUSES: dict[Problem, tuple[Problem, ...]] = {
    Problem.NONFINITE: (E, ET, U, DV),
    E: STEP_SIZE,
    U: (E, ET),
    DV: (U,),
    Problem.VANISHING: STEP_SIZE,
    Problem.DEAD_UNITS: STEP_SIZE,
    Problem.SATURATION: STEP_SIZE,
}
"""Problem -> the problems that can lead to it."""

ORDER = (E, ET, U, DV)
"""Tie-break at the same onset: what is measured before the update comes first."""


def onset(finding: Finding) -> int | None:
    """The step a finding's problem began (its episode's onset, else its step)."""
    if finding.episode is not None and finding.episode.onset is not None:
        return finding.episode.onset
    return finding.step


def _rank(f: Finding) -> tuple[int, int]:
    return (onset(f) or 0, ORDER.index(f.problem) if f.problem in ORDER else len(ORDER))


def _precedes(cause: Finding, effect: Finding) -> bool:
    a, b = onset(cause), onset(effect)
    if a is None or b is None:
        return False
    if effect.problem is Problem.NONFINITE or (a == b and _rank(cause) < _rank(effect)):
        return a <= b
    return a < b


def chain(findings: Sequence[Finding]) -> list[Finding]:
    """The findings of the chain, first cause first (empty when none led to another)."""
    first: dict[Problem, Finding] = {}
    for f in sorted(findings, key=_rank):
        first.setdefault(f.problem, f)
    parent: dict[Problem, Finding] = {}
    for problem, effect in first.items():
        candidates = [first[c] for c in CAUSES.get(problem, ()) if c in first]
        candidates = [c for c in candidates if c is not effect and _precedes(c, effect)]
        if candidates:
            parent[problem] = min(candidates, key=_rank)
    if not parent:
        return []
    members = {p for p in parent} | {c.problem for c in parent.values()}
    return sorted((first[p] for p in members), key=_rank)


def links(findings: Sequence[Finding]) -> list[ChainLink]:
    """The chain as :class:`~gradmedic.findings.ChainLink` s."""
    return [ChainLink(f.problem, onset(f), tuple(f.layers)) for f in findings]
