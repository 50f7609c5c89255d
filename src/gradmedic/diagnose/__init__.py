"""Detectors: pure functions from recorded history rows to findings.

Every module of this package is imported once (``pkgutil``), so each
detector registers itself with :func:`gradmedic.diagnose.registry.register`;
adding a Problem means adding one module.

Example:
    >>> rows = [{"step": 0, "delta_norm": {"0": 1e-9, "1": 1e-6, "2": 1e-3, "3": 1.0}}]
    >>> [f.problem.value for f in diagnose_rows(rows).findings]
    ['vanishing']
    >>> diagnose_rows([]).status
    'no_records'
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gradmedic.diagnose.chain import chain, links
from gradmedic.diagnose.config import DiagnosisConfig
from gradmedic.diagnose.coverage import coverage, warnings_for
from gradmedic.diagnose.episodes import describe
from gradmedic.diagnose.in_time import time_profiles
from gradmedic.diagnose.profile import layer_profile
from gradmedic.diagnose.registry import DETECTORS
from gradmedic.diagnose.setup import setup_of, tailored
from gradmedic.diagnose.suggest import suggest
from gradmedic.findings import Diagnosis, Finding

__all__ = ["DiagnosisConfig", "diagnose_rows"]

_loaded = False


def _load_detectors() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def diagnose_rows(
    rows: Iterable[Mapping[str, Any]],
    config: DiagnosisConfig | None = None,
    layers: Sequence[str] | None = None,
    context: Mapping[str, Any] | None = None,
) -> Diagnosis:
    """Run every registered detector on recorded history rows.

    Args:
        rows: Records in the format of docs/architecture.md, oldest first.
        config: Thresholds (default :class:`DiagnosisConfig`).
        layers: Layer names, input side first (default: the rows' key order).
        context: Model-derived facts the rows do not hold (which activation
            follows each layer, weight scales, forward order of modules, the
            optimizer, what the model already has); merged into
            ``config.context``. Detectors work without it.

    Returns:
        The diagnosis over the whole run: one finding per problem episode
        (onset, peak, recovery), the root-cause chain first, then the other
        findings most severe first; the coverage (records, keys, problems not
        checked); the suggested numbers; the per-layer gradient and delta
        profiles of the latest records.
    """
    if config is None:
        config = DiagnosisConfig()
    elif not isinstance(config, DiagnosisConfig):
        raise TypeError(
            f"config must be a gradmedic.diagnose.DiagnosisConfig, got {type(config).__name__}"
        )
    rows = list(rows)
    bad = next((r for r in rows if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise TypeError(
            f"rows must be mappings (one record per step, see docs/architecture.md), "
            f"got a {type(bad).__name__}"
        )
    # Iterations the optimizer skipped (a GradScaler found inf) are no problem and hold
    # no statistics; they are counted, not diagnosed.
    skipped = sum(1 for r in rows if r.get("skipped"))
    rows = [r for r in rows if not r.get("skipped")]
    merged = {**config.context, **(context or {})}
    if layers is not None:
        merged["layers"] = list(layers)
    merged.pop("suggested", None)
    config = dataclasses.replace(config, context=merged)
    suggestion = suggest(rows, config)
    # computed once: every remedy that names a number reads it (gradmedic.diagnose.suggest)
    config = dataclasses.replace(config, context={**merged, "suggested": suggestion})
    _load_detectors()
    findings = [f for detect in DETECTORS.values() for f in detect(rows, config)]
    setup = setup_of(config)
    findings = [_finish(f, setup, len(rows)) for f in findings]
    findings.sort(key=lambda f: -f.severity.rank)
    head = chain(findings)
    if head:
        root = head[0].problem
        members = {id(f) for f in head}
        rest = [f for f in findings if id(f) not in members]
        head = [head[0], *(dataclasses.replace(f, cause=root) for f in head[1:])]
        findings = [*head, *rest]
    profile = {
        key: prof
        for key in ("grad_norm", "delta_norm")
        if (prof := layer_profile(rows, key, config.window, layers))
    }
    names = list(layers) if layers is not None else _layers_of(rows)
    times = time_profiles(rows)  # {module: ||dL/dh_t|| per time step}, see diagnose/in_time.py
    out_context: dict[str, Any] = {"time_profile": times} if times else {}
    if skipped:
        out_context["skipped_steps"] = skipped
    cov = coverage(rows, skipped, merged)
    return Diagnosis(
        findings=findings,
        layers=names,
        profile=profile,
        context=out_context,
        coverage=cov,
        chain=links(head),
        suggested=suggestion.to_dict() if rows else {},
        warnings=warnings_for(cov, merged),
    )


def _finish(finding: Finding, setup: Any, records: int) -> Finding:
    """Remedies that fit the setup; the episode in the explanation of a multi-record run."""
    remedies = tailored(finding.remedies, setup)
    text = finding.explanation
    if finding.episode is not None and records > 1:
        text = f"{text} {describe(finding.episode)}"
    return dataclasses.replace(finding, remedies=remedies, explanation=text)


def _layers_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    for row in reversed(rows):
        for key in ("grad_norm", "delta_norm"):
            if row.get(key):
                return list(row[key])
    return []
