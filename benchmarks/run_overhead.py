"""Wall time of a whole unmodified script, bare versus under ``gradmedic run``'s AutoAttach.

Run:  python benchmarks/run_overhead.py [--rounds 3] [--threads 1] [-- SCRIPT ARGS...]

Default script: tests/scripts/word_lm.py (word-level RNN LM, manual SGD update, no
optimizer object), 1 epoch. Bare and watched runs are interleaved round by round
in one process (runpy, ``__main__``); the ratio is the median watched time over
the median bare time. Watched runs use the default probe schedules and no sink,
no report: the cost of finding the model, the manual-step detection and recording.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradmedic.autoattach import AutoAttach

ROOT = Path(__file__).resolve().parent.parent


def run_once(script: str, args: list[str], watched: dict | None) -> tuple[float, int]:
    sys.argv = [script, *args]
    session = AutoAttach(**watched) if watched is not None else contextlib.nullcontext()
    with contextlib.redirect_stdout(None):
        start = time.perf_counter()
        with session:
            runpy.run_path(script, run_name="__main__")
        elapsed = time.perf_counter() - start
    records = sum(w.monitor.history.total for w in session.watched) if watched is not None else 0
    return elapsed, records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("script", nargs="*")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    tmp = tempfile.mkdtemp()
    script, *args = ns.script or [
        str(ROOT / "tests/scripts/word_lm.py"), "--epochs", "1", "--save", f"{tmp}/m.pt",
    ]  # fmt: skip
    configs = {"watched (defaults)": {}, "watched, recurrent probe off": {"recurrent": False}}
    times: dict[str, list[float]] = {"bare": [], **{k: [] for k in configs}}
    records: dict[str, int] = {}
    run_once(script, args, None)  # warm-up
    for _ in range(ns.rounds):
        times["bare"].append(run_once(script, args, None)[0])
        for name, options in configs.items():
            t, records[name] = run_once(script, args, options)
            times[name].append(t)
    b = statistics.median(times["bare"])
    print(f"script: {Path(script).name} {' '.join(args)}  torch {torch.__version__}, "
          f"{ns.threads} thread(s), {ns.rounds} rounds")  # fmt: skip
    print(f"{'bare':30s} {b * 1e3:8.1f} ms")
    for name in configs:
        w = statistics.median(times[name])
        print(f"{name:30s} {w * 1e3:8.1f} ms  ratio {w / b:.3f}  ({records[name]} records)")


if __name__ == "__main__":
    main()
