"""Running experiments: fixed seeds, timing, failures kept as results, several at a time."""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
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


def default_jobs() -> int:
    """How many experiments :func:`run` may run at once here: one per usable core, at most 4.

    1 where processes cannot be forked (the workers inherit the parent's
    imports and registry, which only ``fork`` gives).
    """
    if not can_fork():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


def can_fork() -> bool:
    """Whether worker processes can be forked (Linux)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def run(
    names: Sequence[str] | None = None,
    config: LabConfig | None = None,
    *,
    threads: int | None = 1,
    jobs: int = 1,
    durations: Mapping[str, float] | None = None,
    on_start: Callable[[Experiment], None] | None = None,
    on_done: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run the experiments called ``names`` (all when empty).

    Every experiment starts from the same seed, so its numbers do not depend on
    which others ran before it, nor on whether it ran in a worker process. A
    module that failed to import is reported as a failed result (only when
    running all).

    Args:
        names: Experiment names; all registered ones when empty.
        config: Lab settings (default: full run, seed 0, digits data).
        threads: torch threads per experiment (None: leave as is).
        jobs: Experiments run at once, each in a forked worker process
            (:func:`default_jobs` says how many fit); 1 runs them here, one
            after the other. Workers return their figures rendered as
            :class:`~gradmedic.lab.plotting.Svg`.
        durations: Seconds each experiment took before (e.g. in the last run); with
            ``jobs > 1`` the longest start first, those not listed before them, so
            that no long one is left to run alone at the end. Results keep
            registry order either way.
        on_start: Called with each experiment before it runs (with ``jobs > 1``:
            as it is handed to the workers).
        on_done: Called with each result as it is finished.

    Returns:
        One Result per experiment, in registry order.

    Raises:
        ValueError: ``jobs`` is below 1.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    config = config or LabConfig()
    chosen = select(names)
    with _torch_threads(threads):
        if jobs > 1 and len(chosen) > 1 and can_fork():
            results = _run_in_workers(
                chosen, config, threads, jobs, durations or {}, on_start, on_done
            )
        else:
            results = []
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


def _run_in_workers(
    chosen: Sequence[Experiment],
    config: LabConfig,
    threads: int | None,
    jobs: int,
    durations: Mapping[str, float],
    on_start: Callable[[Experiment], None] | None,
    on_done: Callable[[Result], None] | None,
) -> list[Result]:
    """Run ``chosen`` in ``jobs`` forked workers; results in the order of ``chosen``."""
    _warm_up(config)  # done once here, inherited by every worker instead of repeated in each
    pool = ProcessPoolExecutor(
        min(jobs, len(chosen)),
        mp_context=multiprocessing.get_context("fork"),
        initializer=_start_worker,
        initargs=(threads,),
    )
    with pool:
        futures: dict[Future[Result], int] = {}
        # Longest first (unknown ones count as longest): the classic greedy schedule.
        order = sorted(range(len(chosen)), key=lambda i: -durations.get(chosen[i].name, math.inf))
        for i in order:
            exp = chosen[i]
            if on_start is not None:
                on_start(exp)
            futures[pool.submit(_run_rendered, exp.name, config)] = i
        results: list[Result | None] = [None] * len(chosen)
        for future in as_completed(futures):
            i = futures[future]
            exp = chosen[i]
            try:
                result = future.result()
            except Exception as exc:  # the worker died, or its result would not pickle
                result = failed(exp.name, list(exp.claims), exp.title, exc)
            results[i] = result
            if on_done is not None:
                on_done(result)
    return [r for r in results if r is not None]


def _start_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _run_rendered(name: str, config: LabConfig) -> Result:
    """In a worker: run experiment ``name`` and render its figures (the costly part) to SVG."""
    from gradmedic.lab import plotting

    exp = EXPERIMENTS[name]
    result = run_one(exp, config)
    try:
        result.figures = {k: plotting.render(fig) for k, fig in result.figures.items()}
    except Exception as exc:
        return failed(exp.name, list(exp.claims), exp.title, exc)
    return result


def _warm_up(config: LabConfig) -> None:
    """Import and load what nearly every experiment needs, before the workers fork."""
    from matplotlib.backends import backend_svg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401

    from gradmedic.lab import data

    try:
        data.load(config.seed, config.mnist_dir)  # cached; a bad folder fails in the experiment
    except GradmedicError:
        pass
    layer = torch.nn.Linear(2, 1)
    torch.optim.SGD(layer.parameters(), lr=0.0).step()  # the first optimizer imports torch._dynamo


def _claim_key(claims: Sequence[str]) -> tuple[int, int]:
    if not claims:
        return (2, 0)
    first = claims[0]
    kind = 0 if first.startswith("K") else 1
    digits = "".join(ch for ch in first if ch.isdigit())
    return (kind, int(digits) if digits else 0)
