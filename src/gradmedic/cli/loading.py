"""Loading a user's model from ``path/to/file.py:factory``.

The factory is called with no arguments and returns a model, ``(model, inputs)``
or ``(model, (inputs, targets))``.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gradmedic.errors import GradmedicError


@dataclass
class Loaded:
    """What a factory returned: the model and, if it gave one, a batch."""

    model: nn.Module
    inputs: Any = None
    targets: Any = None


def load_factory(spec: str) -> Any:
    """The callable named by ``path/to/file.py:factory``.

    Raises:
        GradmedicError: The spec has no ``:name`` part, or the file has no such callable.
        FileNotFoundError: The file does not exist.
    """
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise GradmedicError(f"TARGET must look like path/to/file.py:factory, got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"TARGET file {path_text!r} does not exist")
    module_name = f"_gradmedic_user_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise GradmedicError(f"cannot import {path_text!r} as Python (is it a .py file?)")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.resolve().parent))
    factory = getattr(module, name, None)
    if not callable(factory):
        raise GradmedicError(f"{path_text!r} defines no callable named {name!r}")
    return factory


def load_target(spec: str) -> Loaded:
    """Call the factory of ``spec`` and sort its result into model and batch.

    Raises:
        GradmedicError: The factory returned something else than a model,
            ``(model, inputs)`` or ``(model, (inputs, targets))``.
    """
    result = load_factory(spec)()
    if isinstance(result, nn.Module):
        return Loaded(result)
    if isinstance(result, tuple | list) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, batch = result
        if isinstance(batch, tuple | list) and len(batch) == 2:
            return Loaded(model, batch[0], batch[1])
        return Loaded(model, batch)
    raise GradmedicError(
        f"the factory of {spec!r} returned {type(result).__name__}; it must return a "
        "torch.nn.Module, (model, inputs) or (model, (inputs, targets))"
    )
