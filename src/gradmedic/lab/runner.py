"""Running experiments: fixed seeds, timing, and failures kept as results."""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from gradmedic.errors import GradmedicError
from gradmedic.lab.base import EXPERIMENTS, Experiment, LabConfig, Result, Verdict


def registry() -> dict[str, Experiment]:
    """Every registered experiment (importing all experiment modules first), sorted by claim."""
    from gradmedic.lab.experiments import load_all

    load_all()
    return dict(sorted(EXPERIMENTS.items(), key=lambda kv: (_claim_key(kv[1].claims), kv[0])))


def import_failures() -> dict[str, str]:
    """``{module: traceback}`` for experiment modules that failed to import."""
    from gradmedic.lab.experiments import load_all

    return load_all()


def select(names: Sequence[str] | None = None) -> list[Experiment]:
    """The experiments called ``names`` (all when empty), in registry order.

    Raises:
        GradmedicError: A name is not a registered experiment.
    """
    known = registry()
    if not names:
        return list(known.values())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise GradmedicError(
            f"unknown experiment {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(known)} (see `gradmedic lab --list`)"
        )
    return [e for n, e in known.items() if n in set(names)]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_one(exp: Experiment, config: LabConfig) -> Result:
    """Run one experiment with seeds fixed to ``config.seed``; never raises.

    An exception inside the experiment becomes a Result with verdict ``ERROR``
    and the traceback in ``error``.
    """
    seed_everything(config.seed)
    start = time.perf_counter()
    try:
        result = exp.fn(config)
        if not isinstance(result, Result):
            raise TypeError(f"experiment {exp.name!r} returned {type(result).__name__}, not Result")
        result.to_dict()  # the numbers must serialize
    except Exception as exc:
        result = failed(exp.name, list(exp.claims), exp.title, exc)
    result.seconds = time.perf_counter() - start
    return result


def failed(name: str, claims: list[str], title: str, exc: BaseException) -> Result:
    """A Result for an experiment that raised ``exc``."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Result(
        name=name,
        claims=claims,
        title=title,
        setup="",
        expected="",
        numbers={},
        rule="",
        verdict=Verdict.ERROR,
        explanation=f"The experiment raised {type(exc).__name__}: {exc}",
        error=tb,
    )


def run(
    names: Sequence[str] | None = None,
    config: LabConfig | None = None,
    *,
    threads: int | None = 1,
    on_start: Callable[[Experiment], None] | None = None,
    on_done: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run the experiments called ``names`` (all when empty).

    Every experiment starts from the same seed, so its numbers do not depend on
    which others ran before it. A module that failed to import is reported as a
    failed result (only when running all).

    Args:
        names: Experiment names; all registered ones when empty.
        config: Lab settings (default: full run, seed 0, digits data).
        threads: torch threads while running (None: leave as is).
        on_start: Called with each experiment before it runs.
        on_done: Called with each result.

    Returns:
        One Result per experiment, in registry order.
    """
    config = config or LabConfig()
    chosen = select(names)
    results: list[Result] = []
    with _torch_threads(threads):
        for exp in chosen:
            if on_start is not None:
                on_start(exp)
            result = run_one(exp, config)
            results.append(result)
            if on_done is not None:
                on_done(result)
    if not names:
        for module, tb in import_failures().items():
            result = Result(
                name=module,
                claims=[],
                title=f"experiment module {module} failed to import",
                setup="",
                expected="",
                numbers={},
                rule="",
                verdict=Verdict.ERROR,
                explanation="The module raised while being imported; its experiments did not run.",
                error=tb,
            )
            results.append(result)
            if on_done is not None:
                on_done(result)
    return results


def _claim_key(claims: Sequence[str]) -> tuple[int, int]:
    if not claims:
        return (2, 0)
    first = claims[0]
    kind = 0 if first.startswith("K") else 1
    digits = "".join(ch for ch in first if ch.isdigit())
    return (kind, int(digits) if digits else 0)
