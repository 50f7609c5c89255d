"""One recorded step: statistics kept as tensors until somebody reads them.

Probes put per-layer statistics into a record as :class:`NamedVector` (names
plus a 1-d tensor on the gradients' device) or 0-d tensors. Reading the record
(:meth:`LazyRecord.to_dict`) moves every tensor to the host in one transfer
per device, so a GPU run pays one synchronisation per *read* record, not one
per statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class NamedVector:
    """Per-layer (or per-parameter) values: ``values[i]`` belongs to ``names[i]``."""

    names: tuple[str, ...]
    values: torch.Tensor

    def __post_init__(self) -> None:
        if self.values.dim() != 1 or self.values.numel() != len(self.names):
            raise ValueError(
                f"NamedVector needs a 1-d tensor of {len(self.names)} values, "
                f"got shape {tuple(self.values.shape)}"
            )


class LazyRecord:
    """A step's statistics, materialised to plain Python on first read."""

    __slots__ = ("_data", "_finalize", "_plain")

    def __init__(
        self,
        data: Mapping[str, Any],
        finalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self._data: Mapping[str, Any] | None = data
        self._finalize = finalize
        self._plain: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as plain dicts, lists, floats and ints (cached)."""
        if self._plain is None:
            assert self._data is not None
            plain = materialize(self._data)
            self._plain = self._finalize(plain) if self._finalize else plain
            self._data = None  # drop device tensors once read
            self._finalize = None
        return self._plain

    @property
    def unread(self) -> Mapping[str, Any] | None:
        """The step's statistics, tensors included, while the record has not been read."""
        return self._data if self._plain is None else None

    @property
    def step(self) -> int:
        """The step this record belongs to."""
        data = self._plain if self._plain is not None else self._data
        return int(data["step"])  # type: ignore[index]


def materialize(data: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a record holding tensors into plain Python data.

    Tensors are gathered per device, concatenated and copied to the host once.
    """
    tensors: list[torch.Tensor] = []
    _collect(data, tensors)
    values: list[float] = []
    if tensors:
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            by_device.setdefault(t.device, []).append(i)
        values = [0.0] * sum(t.numel() for t in tensors)
        offsets = _offsets(tensors)
        for idx in by_device.values():
            flat = torch.cat([tensors[i].detach().reshape(-1).to(torch.float64) for i in idx])
            host = flat.cpu().tolist()
            pos = 0
            for i in idx:
                n = tensors[i].numel()
                values[offsets[i] : offsets[i] + n] = host[pos : pos + n]
                pos += n
    it = iter(values)
    return _rebuild(data, it)


def _offsets(tensors: Sequence[torch.Tensor]) -> list[int]:
    out, total = [], 0
    for t in tensors:
        out.append(total)
        total += t.numel()
    return out


def _collect(value: Any, sink: list[torch.Tensor]) -> None:
    if isinstance(value, NamedVector):
        sink.append(value.values)
    elif isinstance(value, torch.Tensor):
        sink.append(value)
    elif isinstance(value, Mapping):
        for v in value.values():
            _collect(v, sink)
    elif isinstance(value, list | tuple):
        for v in value:
            _collect(v, sink)


def _rebuild(value: Any, it: Any) -> Any:
    if isinstance(value, NamedVector):
        return {name: next(it) for name in value.names}
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            v = next(it)
            return int(v) if not value.is_floating_point() else v
        return [next(it) for _ in range(value.numel())]
    if isinstance(value, Mapping):
        return {k: _rebuild(v, it) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rebuild(v, it) for v in value]
    return value
