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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only read here: findings.py calls this module without an import cycle
    from gradmedic.findings import Diagnosis, Finding


def summary_text(diagnosis: Diagnosis) -> str:
    """Status line, the diagnosis' own warnings, then two lines per finding (what, where; a fix)."""
    lines = [_status(diagnosis)]
    lines.extend(f"! {w}" for w in diagnosis.warnings if not w.startswith(_NOTHING))
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
    said = [
        f"<li>! {html.escape(w)}</li>" for w in diagnosis.warnings if w[: len(_NOTHING)] != _NOTHING
    ]
    items = said + items
    body = f"<ul>{''.join(items)}</ul>" if items else ""
    return (
        f'<div class="gradmedic-diagnosis"><b style="color:{color}">'
        f"{html.escape(_status(diagnosis))}</b>{body}</div>"
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
        layers = list(f.layers)
        shown = ", ".join(layers if len(layers) <= 4 else [*layers[:3], "...", layers[-1]])
        text += f"; layers {shown}"
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


def _status(d: Diagnosis) -> str:
    cov = d.coverage
    span = ""
    if cov is not None and cov.steps:
        span = f" ({cov.steps} records, steps {cov.first_step}-{cov.last_step})"
    if d.status == "no_records":
        why = next((n for n in d.warnings if n.startswith(_NOTHING)), None)
        return "gradmedic: nothing diagnosed: " + (
            why[len(_NOTHING) :] if why else "no step was recorded"
        )
    if d.status == "not_reached" and cov is not None:
        return (
            f"gradmedic: not healthy: {len(cov.unreached)} monitored layer(s) never "
            f"received a gradient{span}"
        )
    if d.status == "nothing_checked":
        why = next((n for n in d.warnings if n.startswith(_NOTHING)), None)
        if why:
            return "gradmedic: nothing diagnosed: " + why[len(_NOTHING) :]
        return f"gradmedic: nothing diagnosed: the records hold no evidence any check reads{span}"
    if d.healthy:
        return f"gradmedic: healthy, no gradient problem found{span}"
    listed = ", ".join(f"{f.problem.value} ({f.severity.value})" for f in d.findings)
    return f"gradmedic: {len(d.findings)} finding(s): {listed}{span}"


def _num(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"
