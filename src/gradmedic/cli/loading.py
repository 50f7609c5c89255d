"""Loading a user's model from ``path/to/file.py:factory``.

The factory is called with no arguments and returns a model, ``(model, inputs)``
or ``(model, (inputs, targets))``. Whatever the user's file raises (when imported
or when the factory runs) comes out as a :class:`~gradmedic.errors.UserCodeError`
naming the file and line.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gradmedic.cli.errors import user_code
from gradmedic.errors import GradmedicError, UserCodeError, display_path, one_line


@dataclass
class Loaded:
    """What a factory returned: the model and, if it gave one, a batch."""

    model: nn.Module
    inputs: Any = None
    targets: Any = None
    factory: Factory | None = None

    def user_code(self, **kwargs: Any) -> Any:
        """A context mapping errors of the user's code (e.g. the model's forward)."""
        if self.factory is not None:
            return self.factory.user_code(model=self.model, **kwargs)
        return user_code(model=self.model, **kwargs)


class Factory:
    """The user's callable of a ``file.py:name`` target; calling it maps its errors.

    Attributes:
        fn: The callable itself.
        path: The user's file, resolved.
        name: The callable's name in that file.
        source: ``"file.py:LINE (name)"``, for messages.
    """

    def __init__(self, fn: Any, path: Path, name: str) -> None:
        self.fn = fn
        self.path = path
        self.name = name
        try:
            line: int | None = inspect.getsourcelines(fn)[1]
        except (OSError, TypeError):
            line = getattr(getattr(fn, "__code__", None), "co_firstlineno", None)
        where = display_path(str(path)) + (f":{line}" if line else "")
        self.source = f"{where} ({name})"

    def user_code(self, **kwargs: Any) -> Any:
        """A context in which errors of the user's code become UserCodeErrors."""
        return user_code([self.path], source=self.source, **kwargs)

    def __call__(self) -> Any:
        """Call the user's factory; what it raises comes out as a UserCodeError."""
        with self.user_code():
            return self.fn()


def load_factory(spec: str) -> Factory:
    """The callable named by ``path/to/file.py:factory``, wrapped in a :class:`Factory`.

    Raises:
        GradmedicError: The spec has no ``:name`` part, or the file has no such callable.
        FileNotFoundError: The file does not exist.
        UserCodeError: Importing the file raised (a syntax error, a failing import...).
    """
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise GradmedicError(f"TARGET must look like path/to/file.py:factory, got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"TARGET file {path_text!r} does not exist")
    path = path.resolve()
    module_name = f"_gradmedic_user_{abs(hash(path))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise GradmedicError(f"cannot import {path_text!r} as Python (is it a .py file?)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses, pickling and inspect look it up
    sys.path.insert(0, str(path.parent))  # let the file import its neighbours
    try:
        with user_code([path]):
            module_spec.loader.exec_module(module)
    except UserCodeError:
        sys.modules.pop(module_name, None)
        raise
    except Exception as exc:  # raised without a frame in the file (rare): still the user's
        sys.modules.pop(module_name, None)
        raise UserCodeError(
            f"importing {display_path(str(path))} raised: {one_line(exc)}", exc, str(path)
        ) from exc
    finally:
        sys.path.remove(str(path.parent))
    factory = getattr(module, name, None)
    if not callable(factory):
        raise GradmedicError(f"{path_text!r} defines no callable named {name!r}")
    return Factory(factory, path, name)


def load_target(spec: str) -> Loaded:
    """Call the factory of ``spec`` and sort its result into model and batch.

    Raises:
        GradmedicError: The factory returned something else than a model,
            ``(model, inputs)`` or ``(model, (inputs, targets))``.
        UserCodeError: The factory (or its file) raised.
    """
    factory = load_factory(spec)
    result = factory()
    if isinstance(result, nn.Module):
        return Loaded(result, factory=factory)
    if isinstance(result, tuple | list) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, batch = result
        if isinstance(batch, tuple | list) and len(batch) == 2:
            return Loaded(model, batch[0], batch[1], factory)
        return Loaded(model, batch, factory=factory)
    raise GradmedicError(
        f"the factory of {spec!r} returned {type(result).__name__}; it must return a "
        "torch.nn.Module, (model, inputs) or (model, (inputs, targets))"
    )
