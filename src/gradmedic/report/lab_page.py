"""The lab's HTML report: a self-contained folder with index.html, results.json and SVG figures.

``index.html`` opens with the claims table (every claim of the catalogue, the
experiments that test it and their verdicts), then one section per experiment:
setup, figures inlined as SVG, the checks and numbers, the rule, the verdict and
the explanation. ``results.json`` holds the same results as plain data, so every
verdict can be re-derived from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gradmedic.errors import GradmedicError
from gradmedic.lab.base import LabConfig, Result, Verdict, combine
from gradmedic.lab.claims import CLAIMS, SOURCES

NOT_TESTED = "not tested"
_SCALAR = (bool, int, float, str)


def claims_table(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per claim of the catalogue: the experiments testing it and the combined verdict.

    A claim that no result tests gets the verdict ``"not tested"``.
    """
    rows = []
    for claim in CLAIMS.values():
        tests = [
            {"name": r.name, "verdict": r.claim_verdict(claim.id).value}
            for r in results
            if claim.id in r.claims
        ]
        verdict = combine(Verdict(t["verdict"]) for t in tests).value if tests else NOT_TESTED
        rows.append(
            {
                "id": claim.id,
                "title": claim.title,
                "text": claim.text,
                "seeds": list(claim.seeds),
                "sources": [{"id": src.id, "title": src.english} for src in claim.sources],
                "experiments": tests,
                "verdict": verdict,
            }
        )
    return rows


def write_report(
    results: Sequence[Result],
    out_dir: str | Path,
    *,
    config: LabConfig | None = None,
    source_dir: str | Path | None = None,
) -> Path:
    """Write ``index.html``, ``results.json`` and ``figures/*.svg`` into ``out_dir``.

    Args:
        results: The lab's results (figures as matplotlib Figures, rendered
            :class:`~gradmedic.lab.plotting.Svg`, or SVG paths relative to
            ``source_dir`` for results loaded from JSON).
        out_dir: The report folder (created if missing).
        config: The settings the lab ran with (recorded in results.json).
        source_dir: Where SVG paths of loaded results are relative to.

    Returns:
        The path of ``index.html``.
    """
    from gradmedic.lab.plotting import Svg, to_svg
    from gradmedic.version import __version__

    out = report_folder(out_dir)
    previous = previous_figures(out)
    sections, records = [], []
    for result in results:
        paths, figures = {}, []
        for fig_name, fig in result.figures.items():
            rel = f"figures/{_slug(result.name)}-{_slug(fig_name)}.svg"
            if isinstance(fig, Svg):
                svg = str(fig)
            elif isinstance(fig, str | Path):
                svg = _read_svg(fig, source_dir)
            else:
                svg = to_svg(fig)
            (out / rel).write_text(svg, encoding="utf-8")
            paths[fig_name] = rel
            figures.append(
                {"name": fig_name, "path": rel, "svg": inline_svg(svg, f"{result.name}-{fig_name}")}
            )
            _close(fig)
        record = result.to_dict(paths)
        records.append(record)
        sections.append(
            {
                **record,
                "anchor": _slug(result.name),
                "figures": figures,
                "checks": _checks(result.numbers),
                "scalars": flatten(result.numbers),
                "json": json.dumps(record["numbers"], indent=1),
            }
        )
    table = claims_table(results)
    payload = {
        "gradmedic": __version__,
        "config": asdict(config) if config is not None else None,
        "claims": table,
        "sources": [asdict(src) for src in SOURCES.values()],
        "results": records,
    }
    written = {p for r in records for p in r["figures"].values()}
    for stale in sorted(previous - written):
        (out / stale).unlink(missing_ok=True)
    text = json.dumps(payload, indent=1, allow_nan=False)  # non-finite numbers are null already
    (out / "results.json").write_text(text, encoding="utf-8")
    html = _template().render(
        version=__version__,
        config=payload["config"],
        claims=table,
        sections=sections,
        sources=list(SOURCES.values()),
        summary=verdict_counts(results),
        claim_summary=_count(row["verdict"] for row in table),
        n_figures=sum(len(s["figures"]) for s in sections),
        verdict_class=_verdict_class,
    )
    index = out / "index.html"
    index.write_text(html, encoding="utf-8")
    return index


def verdict_counts(results: Sequence[Result]) -> list[tuple[str, int]]:
    """``[(verdict, number of experiments)]`` in verdict order, verdicts with none left out."""
    return _count(r.verdict.value for r in results)


def previous_figures(out_dir: str | Path) -> set[str]:
    """The SVGs an earlier report in ``out_dir`` wrote (read from its results.json).

    Only paths the lab itself wrote count (``figures/*.svg`` listed in
    results.json), so re-running a subset removes stale figures and never a
    user's other files. An unreadable or foreign results.json gives none.
    """
    path = Path(out_dir) / "results.json"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        listed = [p for r in payload["results"] for p in r.get("figures", {}).values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {
        p for p in listed if isinstance(p, str) and re.fullmatch(r"figures/[A-Za-z0-9_-]+\.svg", p)
    }


def previous_seconds(out_dir: str | Path, config: LabConfig) -> dict[str, float]:
    """``{experiment: seconds}`` from the results.json in ``out_dir`` of a run like ``config``.

    Empty when there is none, it cannot be read, or it was a run of another size
    (quick vs full) or data set, so its times say nothing about this one.
    """
    path = Path(out_dir) / "results.json"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload["config"] != asdict(config):
            return {}
        return {str(r["name"]): float(r["seconds"]) for r in payload["results"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def load_results(path: str | Path) -> list[Result]:
    """Results from a results.json written by :func:`write_report` (figures as SVG paths)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return [Result.from_dict(r) for r in payload["results"]]
    except FileNotFoundError as exc:
        raise GradmedicError(f"{path} not found; run `gradmedic lab` to create it") from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise GradmedicError(f"{path} is not a gradmedic lab results.json: {exc}") from exc


def inline_svg(svg: str, prefix: str) -> str:
    """An SVG document ready to inline in HTML: no XML prolog, ids made unique by ``prefix``."""
    svg = re.sub(r"^\s*<\?xml[^>]*\?>\s*", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>\s*", "", svg)
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    if not ids:
        return svg
    tag = _slug(prefix)
    pattern = re.compile(r'(\bid="|#)(' + "|".join(map(re.escape, ids)) + r')(?=["\)])')
    return pattern.sub(lambda m: f"{m.group(1)}{tag}-{m.group(2)}", svg)


def flatten(
    numbers: Mapping[str, Any], *, max_list: int = 6, max_depth: int = 3
) -> list[tuple[str, str]]:
    """The scalar numbers (and short lists) of ``numbers`` as ``(path, formatted value)`` rows.

    Long lists and deep nesting are left to the full JSON shown beside the table;
    ``checks`` is rendered separately.
    """
    rows: list[tuple[str, str]] = []

    def walk(value: Any, path: str, depth: int) -> None:
        if isinstance(value, Mapping):
            if depth >= max_depth:
                return
            for k, v in value.items():
                if not (depth == 0 and k == "checks"):
                    walk(v, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(value, list | tuple):
            if len(value) <= max_list and all(isinstance(v, _SCALAR) for v in value):
                rows.append((path, "[" + ", ".join(_fmt(v) for v in value) + "]"))
        elif isinstance(value, _SCALAR) or value is None:
            rows.append((path, _fmt(value)))

    walk(numbers, "", 0)
    return rows


def _checks(numbers: Mapping[str, Any]) -> list[dict[str, Any]]:
    checks = numbers.get("checks")
    if not isinstance(checks, Mapping):
        return []
    out: list[dict[str, Any]] = []
    for claim, group in checks.items():
        if isinstance(group, Mapping):
            out.extend({"claim": claim, "name": k, "passed": bool(v)} for k, v in group.items())
        else:
            out.append({"claim": "", "name": claim, "passed": bool(group)})
    return out


def _count(verdicts: Any) -> list[tuple[str, int]]:
    seen = list(verdicts)
    order = [v.value for v in Verdict] + [NOT_TESTED]
    return [(v, seen.count(v)) for v in order if seen.count(v)]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _verdict_class(verdict: str) -> str:
    return {
        Verdict.HOLDS.value: "holds",
        Verdict.PARTLY.value: "partly",
        Verdict.FAILS.value: "fails",
        Verdict.INCONCLUSIVE.value: "inconclusive",
        Verdict.ERROR.value: "error",
    }.get(verdict, "untested")


def _read_svg(path: str | Path, source_dir: str | Path | None) -> str:
    full = Path(source_dir or ".") / path
    try:
        return full.read_text(encoding="utf-8")
    except OSError as exc:
        raise GradmedicError(f"figure {full} cannot be read: {exc}") from exc


def _close(fig: Any) -> None:
    import sys

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and not isinstance(fig, str | Path):
        pyplot.close(fig)  # figures made with pyplot stay registered until closed


def _template() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html")


def report_folder(out_dir: str | Path) -> Path:
    """``out_dir`` with its ``figures/`` subfolder created; a clear error when it cannot be."""
    out = Path(out_dir)
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GradmedicError(f"cannot create the report folder {out}: {exc}") from exc
    return out
