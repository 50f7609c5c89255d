"""What an experiment is: a registered function from a config to a Result."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from gradmedic.findings import _plain


def finite_numbers(value: Any) -> tuple[Any, dict[str, str]]:
    """``value`` as JSON data whose numbers are all finite.

    A non-finite float becomes ``None`` and its JSON Pointer (RFC 6901) goes to
    the second result with the reason (``"nan"``, ``"inf"`` or ``"-inf"``), so a
    numeric array stays numeric and the reason is still recorded.

    Example:
        >>> finite_numbers({"loss": [1.0, float("inf")]})
        ({'loss': [1.0, None]}, {'/loss/1': 'inf'})
    """
    flags: dict[str, str] = {}

    def walk(v: Any, path: str) -> Any:
        if isinstance(v, dict):
            return {k: walk(x, f"{path}/{_escape(k)}") for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, f"{path}/{i}") for i, x in enumerate(v)]
        if isinstance(v, float) and not math.isfinite(v):
            flags[path] = str(v)
            return None
        return v

    return walk(_float_plain(value), ""), flags


def odd_keys(numbers: Mapping[str, Any]) -> list[str]:
    """Keys of ``numbers`` (at any depth) that break the lab's key style.

    A key is a name without ``.`` or ``/`` (those separate the parts of a path,
    as in ``runs/plain/loss``); the sentences under ``checks`` are exempt.
    """
    bad: list[str] = []

    def walk(v: Any, path: str) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                if path == "" and k == "checks":
                    continue
                if "." in str(k) or "/" in str(k):
                    bad.append(f"{path}/{k}")
                walk(x, f"{path}/{k}")
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x, path)

    walk(numbers, "")
    return bad


def restore_nonfinite(numbers: Any, nonfinite: Mapping[str, str]) -> Any:
    """Inverse of :func:`finite_numbers`: put the non-finite floats back (in place)."""
    for pointer, reason in nonfinite.items():
        keys = [_unescape(k) for k in pointer.split("/")[1:]]
        if not keys:
            continue
        node = numbers
        try:
            for k in keys[:-1]:
                node = node[int(k)] if isinstance(node, list) else node[k]
            last = keys[-1]
            if isinstance(node, list):
                node[int(last)] = float(reason)
            else:
                node[last] = float(reason)
        except (KeyError, IndexError, ValueError, TypeError):
            continue  # a pointer that no longer fits: leave the null
    return numbers


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _unescape(key: str) -> str:
    return key.replace("~1", "/").replace("~0", "~")


def _float_plain(value: Any) -> Any:
    if isinstance(value, float):
        return value
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):  # findings' old spelling
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _float_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_float_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, Enum):
        return _float_plain(value.tolist())
    return _plain(value)


class Verdict(str, Enum):
    """How a claim fared under measurement (``str()`` is the value, e.g. ``"holds partly"``).

    ``INCONCLUSIVE``: a precondition of the test failed (e.g. the net did not
    learn, so "clipping does not hurt" cannot be judged); ``ERROR``: the
    experiment itself failed.
    """

    HOLDS = "holds"
    PARTLY = "holds partly"
    FAILS = "does not hold"
    INCONCLUSIVE = "inconclusive"
    ERROR = "experiment failed"

    __str__ = str.__str__  # the value, not "Verdict.HOLDS"


def judge(checks: Mapping[str, bool]) -> Verdict:
    """The standard rule: every check passes -> holds, some -> holds partly, none -> fails.

    Args:
        checks: Named yes/no conditions computed from an experiment's numbers.

    Returns:
        The verdict.

    Example:
        >>> str(judge({"decays": True, "below_bound": False}))
        'holds partly'
    """
    if not checks:
        raise ValueError("checks is empty: an experiment needs at least one check to judge")
    passed = sum(bool(v) for v in checks.values())
    if passed == len(checks):
        return Verdict.HOLDS
    return Verdict.PARTLY if passed else Verdict.FAILS


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """Several verdicts on one claim: all holds -> holds, all fails -> fails, else partly.

    An ``ERROR`` among them makes the combination ``ERROR``; ``INCONCLUSIVE``
    ones are left out unless all are.
    """
    vs = set(verdicts)
    if not vs:
        raise ValueError("verdicts is empty: nothing to combine")
    if Verdict.ERROR in vs:
        return Verdict.ERROR
    if len(vs) > 1:
        vs.discard(Verdict.INCONCLUSIVE)
    if len(vs) == 1:
        return vs.pop()
    return Verdict.PARTLY


def judge_claims(checks: Mapping[str, Mapping[str, bool]]) -> tuple[Verdict, dict[str, Verdict]]:
    """:func:`judge` each claim's checks, then :func:`combine` them.

    Args:
        checks: ``{claim id: {check name: passed}}``.

    Returns:
        ``(overall verdict, {claim id: verdict})``.
    """
    per_claim = {claim: judge(c) for claim, c in checks.items()}
    return combine(per_claim.values()), per_claim


@dataclass(frozen=True)
class LabConfig:
    """Settings shared by all experiments.

    Attributes:
        quick: Smaller sizes so the whole lab runs in under a minute.
        seed: Base random seed (results are reproducible for a given seed).
        mnist_dir: Folder with MNIST IDX files; the digits data set otherwise.
    """

    quick: bool = False
    seed: int = 0
    mnist_dir: str | None = None

    def pick(self, quick: Any, full: Any) -> Any:
        """``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full


@dataclass
class Result:
    """What one experiment found.

    Attributes:
        name: Experiment name (registry key).
        claims: Claim ids it tests, e.g. ``["K2"]``.
        title: One line.
        setup: What was run, for a person.
        expected: The claimed outcome.
        numbers: The measurements (plain data; goes to results.json).
        rule: The rule mapping the numbers to the verdict, stated in words.
        verdict: holds / holds partly / does not hold, computed from ``numbers``.
        explanation: What the numbers mean.
        figures: ``{name: matplotlib Figure}``; written as SVG by the report
            (after loading results.json: ``{name: relative path of the SVG}``).
        seconds: Wall time (filled in by the runner).
        per_claim: Verdict per claim when one experiment tests several claims
            with different checks; a claim missing here gets ``verdict``.
        error: The traceback when the experiment raised (``verdict`` is ``ERROR``).
    """

    setup: str
    expected: str
    numbers: dict[str, Any]
    rule: str
    verdict: Verdict
    # Filled in by @experiment from its registration when an experiment leaves them out.
    name: str = field(default="", kw_only=True)
    claims: list[str] = field(default_factory=list, kw_only=True)
    title: str = field(default="", kw_only=True)
    explanation: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    per_claim: dict[str, Verdict] = field(default_factory=dict)
    error: str | None = None

    def claim_verdict(self, claim: str) -> Verdict:
        """The verdict this experiment gives ``claim``."""
        return self.per_claim.get(claim, self.verdict)

    def to_dict(self, figure_paths: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Plain-data form for results.json; figures become the paths in ``figure_paths``.

        Non-finite numbers become ``None``; ``nonfinite`` maps their paths
        inside ``numbers`` to ``"nan"``, ``"inf"`` or ``"-inf"``.
        """
        numbers, nonfinite = finite_numbers(self.numbers)
        return {
            "name": self.name,
            "claims": list(self.claims),
            "title": self.title,
            "setup": self.setup,
            "expected": self.expected,
            "numbers": numbers,
            "nonfinite": nonfinite,
            "rule": self.rule,
            "verdict": self.verdict.value,
            "per_claim": {c: self.claim_verdict(c).value for c in self.claims},
            "explanation": self.explanation,
            "figures": dict(figure_paths)
            if figure_paths is not None
            else {k: v for k, v in self.figures.items() if _is_path(v)},
            "seconds": self.seconds,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Result:
        """Inverse of :meth:`to_dict` (figures stay paths)."""
        return cls(
            name=data["name"],
            claims=list(data["claims"]),
            title=data["title"],
            setup=data["setup"],
            expected=data["expected"],
            numbers=restore_nonfinite(dict(data["numbers"]), data.get("nonfinite", {})),
            rule=data["rule"],
            verdict=Verdict(data["verdict"]),
            explanation=data.get("explanation", ""),
            figures=dict(data.get("figures", {})),
            seconds=float(data.get("seconds", 0.0)),
            per_claim={c: Verdict(v) for c, v in data.get("per_claim", {}).items()},
            error=data.get("error"),
        )


def _is_path(figure: Any) -> bool:
    from gradmedic.lab.plotting import Svg

    return isinstance(figure, str) and not isinstance(figure, Svg)


@dataclass(frozen=True)
class Experiment:
    """A registered experiment."""

    name: str
    claims: tuple[str, ...]
    title: str
    fn: Callable[[LabConfig], Result]


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(
    name: str, claims: list[str], title: str
) -> Callable[[Callable[[LabConfig], Result]], Callable[[LabConfig], Result]]:
    """Register ``fn(config) -> Result`` as experiment ``name`` testing ``claims``."""

    def wrap(fn: Callable[[LabConfig], Result]) -> Callable[[LabConfig], Result]:
        old = EXPERIMENTS.get(name)
        # Re-importing the same module (after a failed import) re-registers; two modules may not.
        if old is not None and old.fn.__module__ != fn.__module__:
            raise ValueError(
                f"experiment {name!r} registered twice ({old.fn.__module__} and {fn.__module__})"
            )

        @functools.wraps(fn)
        def run(config: LabConfig) -> Result:
            result = fn(config)
            if isinstance(result, Result):  # the runner reports anything else
                result.name = result.name or name
                result.claims = result.claims or list(claims)
                result.title = result.title or title
            return result

        EXPERIMENTS[name] = Experiment(name, tuple(claims), title, run)
        return run

    return wrap
