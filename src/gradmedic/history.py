"""Bounded history of records, and the JSONL sink that survives a crash."""

from __future__ import annotations

import atexit
import json
import os
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from gradmedic.errors import GradmedicError
from gradmedic.record import LazyRecord


class History:
    """The last ``maxlen`` records, oldest first; memory does not grow with training length.

    Records stay unread (device tensors) until somebody reads them. Older ones
    are dropped a chunk at a time, and ``on_evict`` sees each dropped chunk
    before it goes (the monitor looks there for the first non-finite step).
    """

    def __init__(
        self,
        maxlen: int = 1000,
        on_evict: Callable[[list[LazyRecord]], None] | None = None,
    ) -> None:
        if isinstance(maxlen, bool) or not isinstance(maxlen, int):
            raise TypeError(f"history must be an int (steps to keep), got {type(maxlen).__name__}")
        if maxlen < 1:
            raise ValueError(f"history must be >= 1 (steps to keep), got {maxlen}")
        self._records: deque[LazyRecord] = deque()
        self.maxlen = maxlen
        self._chunk = max(1, min(64, maxlen // 4))
        self._on_evict = on_evict
        self.total = 0  # records ever appended, including those evicted

    def append(self, record: LazyRecord) -> None:
        """Add a record; past ``maxlen`` the oldest go, a chunk at a time."""
        self._records.append(record)
        self.total += 1
        if len(self._records) >= self.maxlen + self._chunk:
            self._evict(len(self._records) - self.maxlen)

    def _evict(self, n: int) -> None:
        gone = [self._records.popleft() for _ in range(n)]
        if self._on_evict is not None:
            self._on_evict(gone)

    def _kept(self) -> list[LazyRecord]:
        extra = len(self._records) - self.maxlen
        if extra > 0:
            self._evict(extra)
        return list(self._records)

    def rows(self) -> list[dict[str, Any]]:
        """Every kept record as a plain dict (see docs/architecture.md), oldest first."""
        return [r.to_dict() for r in self._kept()]

    def last(self) -> dict[str, Any] | None:
        """The newest record as a plain dict, or None."""
        return self._records[-1].to_dict() if self._records else None

    def __len__(self) -> int:
        return min(len(self._records), self.maxlen)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (r.to_dict() for r in self._kept())

    def to_jsonl(self, path: str | os.PathLike[str], header: dict[str, Any] | None = None) -> None:
        """Write the kept records to ``path`` (header line first)."""
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(header or {"gradmedic": _version()}) + "\n")
            for row in self.rows():
                fh.write(json.dumps(row) + "\n")


class JsonlSink:
    """Appends one JSON line per record, in batches, so a step pays no host read.

    Records are written and flushed to the OS every ``batch`` records or every
    ``seconds`` of wall time (checked at each record), at :meth:`flush`, at
    :meth:`close`, and at interpreter exit. A crash of the Python process
    (an exception) loses nothing: the monitor closes the sink on the way out,
    and the exit hook flushes the rest. A killed process (SIGKILL, power loss)
    loses at most the records of the last ``seconds`` or ``batch`` records.

    An existing file is appended to, never truncated: each run starts with a
    header line ``{"gradmedic": version, "run": k, "layers": [...]}``. Under
    torch.distributed, ``{rank}`` in the path becomes the process rank, so each
    process of a DDP/FSDP job writes its own file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        header: dict[str, Any],
        batch: int = 64,
        seconds: float = 2.0,
    ) -> None:
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
        self.batch, self.seconds = batch, seconds
        self._pending: list[LazyRecord] = []
        self._last_flush = time.monotonic()
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")
        self.write({**header, "run": run})
        _OPEN_SINKS.add(self)

    def write(self, row: dict[str, Any]) -> None:
        """Append one plain row now (after any pending records) and flush it to the OS."""
        if self._fh is None:
            return
        self.flush()
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def add(self, record: LazyRecord) -> None:
        """Queue a record; it is read and written with the next batch."""
        if self._fh is None:
            return
        self._pending.append(record)
        if len(self._pending) >= self.batch or time.monotonic() - self._last_flush >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Read and write every queued record, then flush the file to the OS."""
        self._last_flush = time.monotonic()
        if self._fh is None or not self._pending:
            return
        pending, self._pending = self._pending, []
        self._fh.write("".join(json.dumps(r.to_dict()) + "\n" for r in pending))
        self._fh.flush()

    def close(self) -> None:
        """Write what is queued and close the file."""
        if self._fh is not None:
            try:
                self.flush()
            finally:
                self._fh.close()
                self._fh = None
                _OPEN_SINKS.discard(self)


_OPEN_SINKS: weakref.WeakSet[JsonlSink] = weakref.WeakSet()


@atexit.register
def _flush_open_sinks() -> None:
    for sink in list(_OPEN_SINKS):
        try:
            sink.close()
        except Exception:  # at exit, a sink that cannot be written must not mask the real error
            pass


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
    from gradmedic.version import __version__

    return __version__
