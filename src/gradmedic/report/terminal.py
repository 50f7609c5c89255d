"""The rich terminal view of a Diagnosis.

A header (status, the root-cause chain, what was recorded and what could not be
checked), a per-layer bar of ``log10`` of the delta and gradient norms from the
input side to the output side, then each finding with its episode, evidence and
ranked remedies.

Example:
    >>> import io
    >>> from rich.console import Console
    >>> from gradmedic.findings import Diagnosis
    >>> console = Console(width=80, record=True, file=io.StringIO())
    >>> console.print(Diagnosis(layers=["0"], profile={"grad_norm": {"0": 0.5}}))
    >>> "healthy" in console.export_text()
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradmedic.report.summary import status_line

if TYPE_CHECKING:  # the renderers only read findings: findings.py calls them without a cycle
    from gradmedic.findings import Diagnosis, Finding

BAR_WIDTH = 24
MAX_ROWS = 40  # layers shown in the bar view; deeper models are sampled evenly
_STYLE = {"info": "blue", "warning": "yellow", "critical": "bold red"}  # by Severity value
#: Width when output goes to a file or pipe (rich would use 80 and cut numbers and names).
PIPE_WIDTH = 200


def console(*, stderr: bool = False) -> Console:
    """A rich Console that does not cut lines at 80 columns when output is not a terminal.

    A terminal keeps its own width; a pipe or file gets ``$COLUMNS`` if set,
    else :data:`PIPE_WIDTH`.
    """
    out = Console(stderr=stderr)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(stderr=stderr, width=PIPE_WIDTH)
    return out


def render_diagnosis(diagnosis: Diagnosis) -> RenderableType:
    """The terminal view of ``diagnosis``: header, per-layer bars, findings."""
    parts: list[RenderableType] = [_header(diagnosis)]
    for warning in diagnosis.warnings:
        parts.append(Text(warning, style="yellow"))
    if diagnosis.chain:
        steps = " -> ".join(
            f"{link.problem.value}" + (f" (step {link.step})" if link.step is not None else "")
            for link in diagnosis.chain
        )
        parts.append(Text(f"root cause first: {steps}", style="bold"))
    cov = render_coverage(diagnosis)
    if cov is not None:
        parts.append(cov)
    bars = render_profile(diagnosis)
    if bars is not None:
        parts.append(bars)
    theory = diagnosis.context.get("theory")
    if isinstance(theory, Mapping) and theory.get("covered"):
        parts.append(
            Text(
                f"Mean-field prediction: per-layer gain {theory.get('geometric_mean_gain', 0):.3g}"
                f", total {theory.get('total_gain', float('nan')):.3g} over "
                f"{len(theory.get('gains', ()))} layers",
                style="dim",
            )
        )
    parts.extend(render_finding(f) for f in diagnosis.findings)
    return Group(*parts)


def _header(diagnosis: Diagnosis) -> Text:
    status = diagnosis.status
    if status in ("no_records", "nothing_checked"):
        return Text("gradmedic: nothing diagnosed (not healthy: nothing was looked at)",
                    style="bold yellow")  # fmt: skip
    if status == "not_reached":
        return Text(status_line(diagnosis), style="bold yellow")
    if diagnosis.healthy:
        return Text("gradmedic: healthy, no gradient problem found", style="bold green")
    listed = ", ".join(f"{f.problem.value} ({f.severity.value})" for f in diagnosis.findings)
    return Text(f"gradmedic: {len(diagnosis.findings)} finding(s): {listed}", style="bold red")


def render_coverage(diagnosis: Diagnosis) -> Text | None:
    """One dim paragraph: records, record keys, problems not checked, notes."""
    cov = diagnosis.coverage
    if cov is None or cov.steps == 0:
        return None
    span = f"steps {cov.first_step}-{cov.last_step}" if cov.steps > 1 else f"step {cov.first_step}"
    listed = list(cov.keys.items())
    keys = ", ".join(f"{k} {n}" for k, n in listed[:10])
    if len(listed) > 10:
        keys += f" and {len(listed) - 10} more"
    head = f"coverage: {cov.steps} record(s), {span}"
    if cov.skipped:
        head += f", {cov.skipped} skipped"
    if keys:
        head += f"; keys: {keys}"
    lines = [head]
    for problem, why in cov.not_checked.items():
        lines.append(f"not checked: {problem}: {why}")
    lines.extend(cov.notes)
    sug = diagnosis.suggested
    if diagnosis.findings and sug:
        if sug.get("clip_norm") is not None:
            lines.append(f"clip threshold {sug['clip_norm']:.3g}: {sug.get('clip_why', '')}")
        lines.append(f"learning-rate factor {sug.get('lr_factor', 0):g}: {sug.get('lr_why', '')}")
    return Text("\n".join(lines), style="dim")


def bar(value: float | None, low: float, high: float, width: int = BAR_WIDTH) -> str:
    """A bar whose length is ``log10(value)`` placed between ``low`` and ``high``."""
    if value is None:
        return ""
    if not math.isfinite(value):
        return "!" * width
    if value <= 0:
        return "·"
    span = high - low
    frac = 1.0 if span <= 0 else (math.log10(value) - low) / span
    return "█" * max(1, round(frac * width))


def render_profile(diagnosis: Diagnosis) -> Table | None:
    """Per-layer bars of log10 delta and gradient norms (None without a profile)."""
    keys = [k for k in ("delta_norm", "grad_norm") if diagnosis.profile.get(k)]
    if not keys:
        return None
    layers = diagnosis.layers or list(diagnosis.profile[keys[0]])
    flagged = {name for f in diagnosis.findings for name in f.layers}
    shown = layers
    if len(layers) > MAX_ROWS:
        step = (len(layers) - 1) / (MAX_ROWS - 1)
        shown = [layers[round(i * step)] for i in range(MAX_ROWS)]
    title = "log10 norms per layer, input side first"
    if len(shown) < len(layers):
        title += f" ({len(shown)} of {len(layers)} layers)"
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    table.add_column("layer", overflow="fold")
    ranges = {}
    for key in keys:
        logs = [math.log10(v) for v in diagnosis.profile[key].values() if 0 < v < math.inf]
        ranges[key] = (min(logs) - 1, max(logs)) if logs else (0.0, 1.0)
        label = "||dL/d output||" if key == "delta_norm" else "||dL/dW||"
        table.add_column(label, no_wrap=True)
        table.add_column("", justify="right", overflow="fold", min_width=8)
    for name in shown:
        cells: list[Any] = [Text(name, style="bold red" if name in flagged else "")]
        for key in keys:
            v = diagnosis.profile[key].get(name)
            style = "cyan" if key == "delta_norm" else "green"
            cells.append(Text(bar(v, *ranges[key]), style=style))
            cells.append("" if v is None else f"{v:.2e}")
        table.add_row(*cells)
    return table


def render_finding(finding: Finding) -> Panel:
    """One finding: explanation, evidence numbers, ranked remedies."""
    layers = list(finding.layers)
    shown = ", ".join(layers[:6]) + (f" ... ({len(layers)} layers)" if len(layers) > 6 else "")
    # Layers go in the body, not the title: a panel title longer than the width is cut.
    body: list[RenderableType] = [Text(f"layers: {shown}", style="bold")] if layers else []
    body.append(Text(finding.explanation))
    evidence = Table(box=None, show_header=False, pad_edge=False)
    evidence.add_column(style="dim", overflow="fold")
    evidence.add_column(overflow="fold")
    for key, value in finding.evidence.items():
        text = short(value)
        if text:
            evidence.add_row(key, text)
    if evidence.row_count:
        body.append(evidence)
    for i, remedy in enumerate(finding.remedies, 1):
        body.append(Text.assemble(f"{i}. {remedy.description}\n   ", (remedy.call, "cyan")))
    when = ""
    ep = finding.episode
    if ep is not None and ep.onset is not None and finding.step is not None:
        when = f" from step {ep.onset}" if ep.last == ep.onset else f" steps {ep.onset}-{ep.last}"
        if ep.recovery is not None:
            when += f", gone at {ep.recovery}"
    if finding.cause is not None:
        when += f" (after {finding.cause.value})"
    return Panel(
        Group(*body),
        title=Text(f"{finding.problem.value} [{finding.severity.value}]{when}"),
        title_align="left",
        border_style=_STYLE[finding.severity.value],
    )


def short(value: Any) -> str:
    """Evidence values in one line: numbers in 3 digits, dicts summarized."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, list | tuple) and not value:
        return ""
    if isinstance(value, list | tuple) and len(value) > 6:
        seq = [v for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(seq) == len(value):
            return f"{len(seq)} values, first {seq[0]:.3g}, last {seq[-1]:.3g}"
        return f"{len(value)} entries"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, Mapping):
        items = list(value.items())
        nums = [(k, v) for k, v in items if isinstance(v, int | float)]
        if len(nums) != len(items) or not nums:
            return ""
        head = ", ".join(f"{k}: {v:.3g}" for k, v in nums[:4])
        return head + (f", ... ({len(nums)} entries)" if len(nums) > 4 else "")
    return str(value)
