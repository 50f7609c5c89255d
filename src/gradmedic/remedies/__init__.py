"""Remedies as PyTorch pieces: clipping, initialization, surgery, weight decay."""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("clipping", "init", "surgery", "weight_decay", "catalog", "registry", "base")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"gradmedic.remedies.{name}")
    raise AttributeError(f"module 'gradmedic.remedies' has no attribute {name!r}")
