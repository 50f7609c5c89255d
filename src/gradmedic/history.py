"""Bounded history of records, and the JSONL sink that survives a crash."""

from __future__ import annotations

import json
import os
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gradmedic.errors import GradmedicError
from gradmedic.record import LazyRecord


class History:
    """The last ``maxlen`` records, oldest first; memory does not grow with training length."""

    def __init__(self, maxlen: int = 1000) -> None:
        if isinstance(maxlen, bool) or not isinstance(maxlen, int):
            raise TypeError(f"history must be an int (steps to keep), got {type(maxlen).__name__}")
        if maxlen < 1:
            raise ValueError(f"history must be >= 1 (steps to keep), got {maxlen}")
        self._records: deque[LazyRecord] = deque(maxlen=maxlen)
        self.maxlen = maxlen
        self.total = 0  # records ever appended, including those evicted

    def append(self, record: LazyRecord) -> None:
        """Add a record, evicting the oldest when full."""
        self._records.append(record)
        self.total += 1

    def rows(self) -> list[dict[str, Any]]:
        """Every kept record as a plain dict (see docs/architecture.md), oldest first."""
        return [r.to_dict() for r in self._records]

    def last(self) -> dict[str, Any] | None:
        """The newest record as a plain dict, or None."""
        return self._records[-1].to_dict() if self._records else None

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (r.to_dict() for r in self._records)

    def to_jsonl(self, path: str | os.PathLike[str], header: dict[str, Any] | None = None) -> None:
        """Write the kept records to ``path`` (header line first)."""
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(header or {"gradmedic": _version()}) + "\n")
            for row in self.rows():
                fh.write(json.dumps(row) + "\n")


class JsonlSink:
    """Appends one JSON line per record and flushes it, so a crash loses nothing recorded.

    An existing file is appended to, never truncated: each run starts with a
    header line ``{"gradmedic": version, "run": k, "layers": [...]}``. Under
    torch.distributed, ``{rank}`` in the path becomes the process rank, so each
    process of a DDP/FSDP job writes its own file.
    """

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any]) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"sink must be a file path, got {type(path).__name__}")
        self.path = Path(_with_rank(os.fspath(path)))
        if self.path.is_dir():
            raise GradmedicError(
                f"sink {self.path} is a directory; give a file path such as run.jsonl"
            )
        run = _count_runs(self.path)
        if run:
            warnings.warn(
                f"gradmedic: {self.path} already holds {run} run(s); this run is appended "
                f"as run {run} after its own header line (load_history(path) and "
                "`gradmedic report` read the last run; delete the file to start afresh)",
                stacklevel=3,
            )
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")
        self.write({**header, "run": run})

    def write(self, row: dict[str, Any]) -> None:
        """Append one line and flush it to the OS."""
        if self._fh is None:
            return
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def load_history(path: str | os.PathLike[str], run: int = -1) -> tuple[dict[str, Any], list[dict]]:
    """Read a JSONL file written by the sink: ``(header, rows)`` of run ``run`` (default: last).

    A truncated last line (a crash mid-write) is skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise GradmedicError(f"no history file at {p}; pass the path given to watch(sink=...)")
    runs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    try:
        with open(p, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    if fh.readline():  # a bad line in the middle is corruption, not a crash
                        raise GradmedicError(f"{p}:{lineno} is not valid JSON") from None
                    break
                if not isinstance(obj, dict):
                    raise GradmedicError(
                        f"{p}:{lineno} is not a gradmedic record (a JSON object); "
                        "pass the JSONL file written by watch(sink=...)"
                    )
                if "gradmedic" in obj:
                    runs.append((obj, []))
                elif runs:
                    runs[-1][1].append(obj)
                else:
                    raise GradmedicError(f"{p} does not start with a gradmedic header line")
    except UnicodeDecodeError:
        raise GradmedicError(
            f"{p} is not a gradmedic JSONL history (not UTF-8 text); pass the file written "
            "by watch(sink=...)"
        ) from None
    if not runs:
        raise GradmedicError(f"{p} holds no gradmedic run")
    try:
        return runs[run]
    except IndexError:
        raise GradmedicError(f"{p} holds {len(runs)} run(s); run={run} is out of range") from None


def _with_rank(path: str) -> str:
    if "{rank}" not in path:
        return path
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return path.replace("{rank}", str(rank))


def _count_runs(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.startswith('{"gradmedic"'))


def _version() -> str:
    from gradmedic import __version__

    return __version__
