"""Short renderings of a Diagnosis: ``str(diagnosis)`` and the notebook's HTML.

One line of status, then each finding in two lines: its problem, severity,
steps, key number and layers; its first remedy with the call that applies it.

Example:
    >>> from gradmedic.findings import Diagnosis
    >>> print(summary_text(Diagnosis()))
    gradmedic: healthy, no gradient problem found
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only read here: findings.py calls this module without an import cycle
    from gradmedic.findings import Diagnosis, Finding


def summary_text(diagnosis: Diagnosis) -> str:
    """Status line, the diagnosis' own warnings, then two lines per finding (what, where; a fix)."""
    lines = [status_line(diagnosis)]
    lines.extend(f"! {w}" for w in _own_warnings(diagnosis))
    for f in diagnosis.findings:
        lines.append(f"- {finding_line(f)}")
        if f.remedies:
            r = f.remedies[0]
            lines.append(f"  fix: {r.description} -> {r.call}")
    return "\n".join(lines)


def summary_html(diagnosis: Diagnosis) -> str:
    """The same summary as HTML (a notebook cell's ``_repr_html_``)."""
    color = {"healthy": "#1a7f37", "findings": "#cf222e"}.get(diagnosis.status, "#b7791f")
    items = []
    for f in diagnosis.findings:
        fix = ""
        if f.remedies:
            r = f.remedies[0]
            fix = f"<br>fix: {html.escape(r.description)} <code>{html.escape(r.call)}</code>"
        items.append(f"<li>{html.escape(finding_line(f))}{fix}</li>")
    items = [f"<li>! {html.escape(w)}</li>" for w in _own_warnings(diagnosis)] + items
    body = f"<ul>{''.join(items)}</ul>" if items else ""
    return (
        f'<div class="gradmedic-diagnosis"><b style="color:{color}">'
        f"{html.escape(status_line(diagnosis))}</b>{body}</div>"
    )


def finding_line(f: Finding) -> str:
    """``problem [severity] steps a-b, peak <measure> <value> at step s; layers ...``."""
    parts = [f"{f.problem.value} [{f.severity.value}]"]
    ep = f.episode
    if ep is not None and ep.onset is not None:
        span = f"step {ep.onset}" if ep.last in (None, ep.onset) else f"steps {ep.onset}-{ep.last}"
        if ep.recovery is not None:
            span += f" (gone at {ep.recovery})"
        parts.append(span)
    key = _key_number(f)
    if key:
        parts.append(key)
    text = " ".join(parts)
    if f.layers:
        text += f"; layers {elided(f.layers)}"
    return text


def _key_number(f: Finding) -> str:
    ep = f.episode
    if ep is not None and ep.peak_value is not None and ep.measure:
        at = f" at step {ep.peak}" if ep.peak is not None else ""
        return f"peak {ep.measure} {_num(ep.peak_value)}{at}"
    for key, value in f.evidence.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{key} {_num(value)}"
    return ""


_NOTHING = "Nothing to diagnose: "


def elided(names: Sequence[str]) -> str:
    """``names`` joined, at most four: ``"a, b, c, ..., z"`` beyond (only what is hidden)."""
    names = list(names)
    return ", ".join(names if len(names) <= 4 else [*names[:3], "...", names[-1]])


def _own_warnings(d: Diagnosis) -> list[str]:
    """The diagnosis' warnings that the status line does not already say."""
    return [w for w in d.warnings if not w.startswith(_NOTHING)]


def _nothing_because(d: Diagnosis) -> str | None:
    """Why nothing was diagnosed, from the warnings (None: they do not say)."""
    return next((w[len(_NOTHING) :] for w in d.warnings if w.startswith(_NOTHING)), None)


def status_line(d: Diagnosis) -> str:
    """One line: healthy, the findings, or why the diagnosis is neither."""
    cov = d.coverage
    span = ""
    if cov is not None and cov.steps:
        span = f" ({cov.steps} records, steps {cov.first_step}-{cov.last_step})"
    if d.status == "no_records":
        return "gradmedic: nothing diagnosed: " + (_nothing_because(d) or "no step was recorded")
    if d.status == "not_reached" and cov is not None:
        return (
            f"gradmedic: not healthy: {len(cov.unreached)} trainable layer(s) never "
            f"received a gradient{span}"
        )
    if d.status == "nothing_checked":
        why = _nothing_because(d)
        if why:
            return "gradmedic: nothing diagnosed: " + why
        return f"gradmedic: nothing diagnosed: the records hold no evidence any check reads{span}"
    if d.healthy:
        return f"gradmedic: healthy, no gradient problem found{span}"
    listed = ", ".join(f"{f.problem.value} ({f.severity.value})" for f in d.findings)
    return f"gradmedic: {len(d.findings)} finding(s): {listed}{span}"


def _num(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"
