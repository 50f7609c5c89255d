"""The HTML report of one recorded run: pictures of the gradient flow, then the findings.

``index.html`` in a folder, self-contained (figures inlined as SVG, also saved
under ``figures/``), with:

* layers x steps heatmaps of log10 gradient norms and of log10 deltas
  ||dL/d(layer output)||, input side at the top;
* the depth profile (norm per layer) at the onset and at the peak of each
  finding (the last record when nothing was found);
* update ratios ||dw||/||w|| and the loss over steps, each finding's episode
  shaded from its onset to its last step;
* each finding with its explanation, evidence and ranked remedies.

A figure whose statistics were not recorded is left out with a note, so a
partial log still makes a report. Reads only rows (docs/architecture.md).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradmedic.findings import Diagnosis, Finding

#: Most steps drawn in a heatmap; longer runs are sampled evenly.
MAX_COLUMNS = 400
_EPISODE_COLORS = ["#cf222e", "#b7791f", "#6e2c91", "#0969da", "#1a7f37"]
_MOMENT_COLORS = ["#0969da", "#cf222e"]  # onset, peak
_LABELS = {"grad_norm": "||dL/dW|| per layer", "delta_norm": "||dL/d output|| per layer"}


def write_run_report(
    rows: Sequence[Mapping[str, Any]],
    diagnosis: Diagnosis,
    out_dir: str | Path,
    *,
    title: str = "gradmedic run report",
    layers: Sequence[str] | None = None,
) -> Path:
    """Write ``index.html`` and ``figures/*.svg`` of a run into ``out_dir``.

    Args:
        rows: The run's records, oldest first (skipped iterations are ignored).
        diagnosis: Its diagnosis (``diagnose_rows(rows)`` or ``monitor.diagnose()``).
        out_dir: The report folder (created if missing).
        title: The page title (e.g. the script and the model).
        layers: Layer names, input side first (default: the diagnosis' layers).

    Returns:
        The path of ``index.html``.
    """
    from gradmedic.lab.plotting import to_svg
    from gradmedic.report.lab_page import inline_svg, report_folder

    out = report_folder(out_dir)
    rows = [r for r in rows if not r.get("skipped")]
    names = list(layers or diagnosis.layers or _layers_of(rows))
    figures: list[tuple[str, str, Any]] = []  # (id, caption, figure or None with a note)
    notes: list[str] = []
    for key in ("grad_norm", "delta_norm"):
        fig = heatmap(rows, names, key)
        if fig is None:
            notes.append(f"no {key} recorded: its heatmap is left out")
        else:
            figures.append((f"heatmap-{key}", f"log10 {_LABELS[key]} over steps", fig))
    for i, (caption, fig) in enumerate(depth_profiles(rows, names, diagnosis.findings)):
        figures.append((f"depth-{i}", caption, fig))
    fig = over_steps(rows, names, diagnosis.findings)
    if fig is None:
        notes.append("no update ratio or loss recorded: their figure is left out")
    else:
        figures.append(("over-steps", "update ratios and loss over steps, episodes shaded", fig))
    parts = []
    for fig_id, caption, fig in figures:
        svg = to_svg(fig)
        (out / "figures" / f"{fig_id}.svg").write_text(svg, encoding="utf-8")
        parts.append(
            f'<figure class="fig" id="{fig_id}">{inline_svg(svg, fig_id)}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    page = _PAGE.format(
        title=html.escape(title),
        summary=html.escape(str(diagnosis)),
        steps=len(rows),
        figures="\n".join(parts),
        notes="".join(f"<li>{html.escape(n)}</li>" for n in notes),
        findings=findings_html(diagnosis),
        n_figures=len(parts),
        data=json.dumps(diagnosis.to_dict()).replace("</", "<\\/"),
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def heatmap(rows: Sequence[Mapping[str, Any]], layers: Sequence[str], key: str) -> Any:
    """Layers x steps image of ``log10`` of per-layer ``key`` (None when never recorded)."""
    import numpy as np

    from gradmedic.lab.plotting import figure, label

    held = [r for r in rows if isinstance(r.get(key), Mapping) and r[key]]
    if not held or not layers:
        return None
    if len(held) > MAX_COLUMNS:
        held = [held[round(i * (len(held) - 1) / (MAX_COLUMNS - 1))] for i in range(MAX_COLUMNS)]
    grid = np.full((len(layers), len(held)), np.nan)
    for j, row in enumerate(held):
        for i, name in enumerate(layers):
            v = row[key].get(name)
            if isinstance(v, int | float) and math.isfinite(v) and v > 0:
                grid[i, j] = math.log10(v)
    steps = [int(r["step"]) for r in held]
    fig, ax = figure(width=8.0, height=min(6.0, 1.6 + 0.18 * len(layers)))
    import matplotlib

    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#bbbbbb")
    left, right = steps[0] - 0.5, steps[-1] + 0.5 if len(steps) > 1 else steps[0] + 0.5
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap,
                      extent=(left, right, len(layers) - 0.5, -0.5))  # fmt: skip
    ax.grid(False)
    ticks = _ticks(len(layers), 16)
    ax.set_yticks(ticks, [layers[t] for t in ticks])
    fig.colorbar(image, ax=ax, label="log10 norm")
    label(ax, _LABELS[key], "step", "layer (input side at top)", legend=False)
    return fig


def depth_profiles(
    rows: Sequence[Mapping[str, Any]], layers: Sequence[str], findings: Sequence[Finding]
) -> list[tuple[str, Any]]:
    """(caption, figure): norms per layer at each finding's onset and peak (else the last row)."""
    moments: list[tuple[str, list[tuple[str, Mapping[str, Any]]]]] = []
    for f in findings:
        ep = f.episode
        if ep is None or ep.onset is None:
            continue
        picked = [(f"{what} (step {row['step']})", row)
                  for what, step in (("onset", ep.onset), ("peak", ep.peak))
                  if step is not None and (row := _at(rows, step)) is not None]  # fmt: skip
        if picked:
            moments.append((f"depth profile of {f.problem.value} at its onset and peak", picked))
    if not moments and rows:
        moments.append(("depth profile at the last record", [("last", rows[-1])]))
    out = []
    for caption, picked in moments:
        fig = _profile_figure(layers, picked, caption)
        if fig is not None:
            out.append((caption, fig))
    return out


def over_steps(
    rows: Sequence[Mapping[str, Any]], layers: Sequence[str], findings: Sequence[Finding]
) -> Any:
    """Update ratios (per layer) and the loss over steps, episodes shaded; None without either."""
    from gradmedic.lab.plotting import figure, label, layer_colors, profile

    has_updates = any(r.get("update_ratio") for r in rows)
    losses = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), int | float)]
    if not has_updates and not losses:
        return None
    fig, axes = figure(ncols=2, width=4.6, height=3.2)
    ax_u, ax_l = axes
    if has_updates:
        shown = [layers[t] for t in _ticks(len(layers), 8)]
        for name, color in zip(shown, layer_colors(len(shown)), strict=True):
            pts = [(r["step"], r["update_ratio"][name]) for r in rows
                   if name in (r.get("update_ratio") or {})]  # fmt: skip
            if pts:
                profile(ax_u, *zip(*pts, strict=True), label=name, color=color)
    else:
        ax_u.text(0.5, 0.5, "no update ratio recorded", ha="center", transform=ax_u.transAxes)
    label(ax_u, "update ratio ||dw||/||w||", "step", "ratio")
    if losses:
        finite = [v for _, v in losses if math.isfinite(v)]
        profile(ax_l, *zip(*losses, strict=True), label="loss",
                log=bool(finite) and min(finite) > 0, color="#1f2328")  # fmt: skip
    else:
        ax_l.text(0.5, 0.5, "no loss recorded", ha="center", transform=ax_l.transAxes)
    label(ax_l, "loss", "step", "loss", legend=False)
    k = 0
    for f in findings:
        ep = f.episode
        if ep is None or ep.onset is None:
            continue
        end = ep.last if ep.last is not None and ep.last > ep.onset else ep.onset
        color = _EPISODE_COLORS[k % len(_EPISODE_COLORS)]
        k += 1
        for ax in (ax_u, ax_l):
            ax.axvspan(ep.onset - 0.5, end + 0.5, color=color, alpha=0.15,
                       label=f.problem.value if ax is ax_l else None)  # fmt: skip
    if findings:
        ax_l.legend()
    return fig


def findings_html(diagnosis: Diagnosis) -> str:
    """The findings as HTML sections: explanation, evidence numbers, ranked remedies."""
    if not diagnosis.findings:
        if diagnosis.healthy:
            return "<p class='ok'>healthy: no gradient problem found.</p>"
        said = "".join(f"<li>{html.escape(w)}</li>" for w in diagnosis.warnings)
        return f"<p class='warn'>{html.escape(diagnosis.status)}: not healthy.</p><ul>{said}</ul>"
    parts = []
    for f in diagnosis.findings:
        ep = f.episode
        when = ""
        if ep is not None and ep.onset is not None:
            when = f"steps {ep.onset}-{ep.last}, peak at {ep.peak}"
            if ep.recovery is not None:
                when += f", gone at {ep.recovery}"
        evidence = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
            for k, v in f.evidence.items()
            if _fmt(v)
        )
        remedies = "".join(
            f"<li>{html.escape(r.description)}<br><code>{html.escape(r.call)}</code></li>"
            for r in f.remedies
        )
        layers = ", ".join(f.layers[:8]) + (
            f" ... ({len(f.layers)} layers)" if len(f.layers) > 8 else ""
        )
        parts.append(
            f'<section class="finding {f.severity.value}" data-problem="{f.problem.value}">'
            f"<h3>{html.escape(f.problem.value)} <small>[{f.severity.value}] "
            f"{html.escape(when)}</small></h3><p class='layers'>{html.escape(layers)}</p>"
            f"<p>{html.escape(f.explanation)}</p>"
            f"<table class='evidence'>{evidence}</table><ol class='remedies'>{remedies}</ol>"
            "</section>"
        )
    return "\n".join(parts)


def _profile_figure(
    layers: Sequence[str], picked: Sequence[tuple[str, Mapping[str, Any]]], title: str
) -> Any:
    from gradmedic.lab.plotting import figure, label, profile

    fig, ax = figure(width=6.0, height=3.4)
    drawn = False
    short = {"grad_norm": "||dL/dW||", "delta_norm": "||dL/d out||"}
    for key, dashed in (("grad_norm", False), ("delta_norm", True)):
        for (what, row), color in zip(picked, _MOMENT_COLORS, strict=False):
            values = row.get(key) or {}
            pts = [(i, values[n]) for i, n in enumerate(layers) if n in values]
            if pts:
                profile(ax, *zip(*pts, strict=True), label=f"{short[key]}, {what}",
                        predicted=dashed, color=color)  # fmt: skip
                drawn = True
    if not drawn:
        return None
    ticks = _ticks(len(layers), 12)
    ax.set_xticks(ticks, [layers[t] for t in ticks], rotation=45, ha="right")
    label(ax, title, "layer, input side first", "norm")
    return fig


def _at(rows: Sequence[Mapping[str, Any]], step: int) -> Mapping[str, Any] | None:
    """The first record at or after ``step``."""
    return next((r for r in rows if r.get("step", -1) >= step), None)


def _ticks(n: int, most: int) -> list[int]:
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _layers_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    for row in rows:
        if isinstance(row.get("grad_norm"), Mapping):
            return list(row["grad_norm"])
    return []


def _fmt(value: Any) -> str:
    from gradmedic.report.terminal import short

    return short(value)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<script>
  window.gradmedicErrors = [];
  window.addEventListener("error", function (e) {{
    window.gradmedicErrors.push(String(e.message));
  }});
</script>
<style>
  body {{ font: 15px/1.5 system-ui, sans-serif; color: #1f2328; margin: 0; }}
  main {{ max-width: 1100px; margin: 0 auto; padding: 1.5rem; }}
  pre.summary {{ background: #f6f8fa; padding: 0.8rem; white-space: pre-wrap; }}
  figure.fig {{ margin: 1rem 0; }} figure.fig svg {{ max-width: 100%; height: auto; }}
  figcaption {{ color: #57606a; font-size: 0.9rem; }}
  section.finding {{ border-left: 4px solid #b7791f; padding: 0.2rem 0.8rem; margin: 1rem 0; }}
  section.critical {{ border-color: #cf222e; }} section.info {{ border-color: #0969da; }}
  table.evidence td {{ padding: 0.1rem 0.6rem 0.1rem 0; vertical-align: top; }}
  td, li, p {{ overflow-wrap: anywhere; }}
  code {{ background: #f6f8fa; padding: 0 0.2rem; }}
</style>
</head>
<body>
<main>
<h1>{title}</h1>
<pre class="summary">{summary}</pre>
<p class="meta">{steps} recorded steps.</p>
<h2>Gradient flow</h2>
{figures}
<ul class="notes">{notes}</ul>
<h2>Findings</h2>
{findings}
<script type="application/json" id="diagnosis">{data}</script>
<div id="selfcheck" hidden data-expected="{n_figures}"></div>
</main>
<script>
  (function () {{
    var figures = document.querySelectorAll("figure.fig > svg");
    var ok = 0, bad = [];
    figures.forEach(function (f) {{
      var r = f.getBoundingClientRect();
      if (r.width > 0 && r.height > 0) {{ ok += 1; }} else {{ bad.push(f.parentElement.id); }}
    }});
    var el = document.getElementById("selfcheck");
    el.setAttribute("data-count", String(figures.length));
    el.setAttribute("data-figures-ok", String(ok));
    el.setAttribute("data-bad", bad.join(" "));
    el.setAttribute("data-findings", String(document.querySelectorAll("section.finding").length));
    el.setAttribute("data-errors", String(window.gradmedicErrors.length));
    el.setAttribute("data-done", "1");
  }})();
</script>
</body>
</html>
"""
