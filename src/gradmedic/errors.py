"""The exceptions gradmedic raises for its users' mistakes, and where user code raised."""

from __future__ import annotations

import os
import sysconfig
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any


class GradmedicError(RuntimeError):
    """A problem with how gradmedic was called or with the data it was given.

    The message always says what was wrong and how to fix it.
    """


class UserCodeError(GradmedicError):
    """Code the user handed to gradmedic raised: a factory, its module, a model's forward.

    The message is one line naming the user's file and line (when known) and the
    original exception; the original stays available as :attr:`original` (and as
    ``__cause__``).

    Attributes:
        original: The exception the user's code raised.
        filename: The user's file where it raised (None when unknown).
        lineno: The line in ``filename`` (None when unknown).
        function: The function at that line (None when unknown).
    """

    def __init__(
        self,
        message: str,
        original: BaseException,
        filename: str | None = None,
        lineno: int | None = None,
        function: str | None = None,
    ) -> None:
        super().__init__(message)
        self.original = original
        self.filename = filename
        self.lineno = lineno
        self.function = function


_PACKAGE = Path(__file__).resolve().parent


def _library_roots() -> tuple[str, ...]:
    roots = {str(_PACKAGE)}
    try:
        import torch

        roots.add(str(Path(torch.__file__).resolve().parent))
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if key in paths:
            roots.add(str(Path(paths[key]).resolve()))
    return tuple(roots)


_LIBRARY_ROOTS: tuple[str, ...] | None = None


def _resolved(filename: str) -> str:
    try:
        return str(Path(filename).resolve())
    except (OSError, ValueError):
        return filename


def _in(filename: str, root: str) -> bool:
    return filename == root or filename.startswith(root + os.sep)


def is_gradmedic_file(filename: str) -> bool:
    """Whether ``filename`` belongs to the gradmedic package."""
    return _in(_resolved(filename), str(_PACKAGE))


def is_torch_file(filename: str) -> bool:
    """Whether ``filename`` belongs to the torch package."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return _in(_resolved(filename), str(Path(torch.__file__).resolve().parent))


def is_library_file(filename: str) -> bool:
    """Whether ``filename`` is gradmedic's, torch's, the standard library's or installed code."""
    global _LIBRARY_ROOTS
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>, ...
        return True
    if _LIBRARY_ROOTS is None:
        _LIBRARY_ROOTS = _library_roots()
    path = _resolved(filename)
    parts = Path(path).parts
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(_in(path, root) for root in _LIBRARY_ROOTS)


def display_path(filename: str) -> str:
    """``filename`` relative to the working directory when it lies under it."""
    path = _resolved(filename)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith("..") else rel


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``"Type: message"`` on one line (whitespace collapsed, long messages cut)."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def describe_inputs(inputs: Any) -> str:
    """A short description of a batch: ``"a tensor of shape (32, 10)"``."""

    def one(x: Any) -> str:
        shape = getattr(x, "shape", None)
        if shape is not None:
            return f"a tensor of shape {tuple(shape)}"
        return f"a {type(x).__name__}"

    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, tuple | list):
        return "(" + ", ".join(one(v) for v in inputs) + ")"
    return one(inputs)


def _module_frame(frames: list[tuple[FrameType, int]], model: Any) -> str | None:
    """``"layer '0' (Linear)"`` for the innermost module method in ``frames``."""
    try:
        from torch import nn
    except ImportError:  # pragma: no cover
        return None
    names = {}
    if isinstance(model, nn.Module):
        names = {id(m): name for name, m in model.named_modules()}
    for frame, _ in reversed(frames):
        module = frame.f_locals.get("self")
        if isinstance(module, nn.Module):
            kind = type(module).__name__
            name = names.get(id(module))
            if name:
                return f"layer '{name}' ({kind})"
            return f"the model ({kind})" if name == "" else f"a {kind} layer"
    return None


def user_code_error(
    exc: BaseException,
    *,
    user_files: Iterable[str | os.PathLike[str]] = (),
    source: str | None = None,
    model: Any = None,
    inputs: Any = None,
) -> UserCodeError | None:
    """A :class:`UserCodeError` for ``exc`` if the user's code raised it, else None.

    The user's code raised when the traceback runs through one of ``user_files``
    (the last such frame is named) or through any file outside gradmedic, torch,
    the standard library and installed packages; or when it ends in torch code
    that gradmedic called with the user's model or data (a forward that does not
    fit the inputs): then the message names the layer and ``source`` (the
    ``file:line`` of the factory that built the model).

    Args:
        exc: The exception.
        user_files: The user's files (e.g. the file of a ``file.py:factory`` target).
        source: Where the model comes from, e.g. ``"model.py:4 (make)"``: named
            when no frame of the user's code is in the traceback.
        model: The model, to name the layer that raised.
        inputs: The batch the model was called with, to name its shape.
    """
    if isinstance(exc, UserCodeError):
        return exc
    files = {_resolved(os.fspath(f)) for f in user_files}
    if isinstance(exc, SyntaxError) and exc.filename and not is_gradmedic_file(exc.filename):
        where = f"{display_path(exc.filename)}:{exc.lineno}"
        return UserCodeError(
            f"your code has a syntax error in {where}: {type(exc).__name__}: {exc.msg}",
            exc,
            exc.filename,
            exc.lineno,
        )
    frames = list(traceback.walk_tb(exc.__traceback__))
    if not frames:
        return None
    shape = f"; the model got {describe_inputs(inputs)}" if inputs is not None else ""
    mine = [f for f in frames if _resolved(f[0].f_code.co_filename) in files]
    if not mine:
        mine = [f for f in frames if not is_library_file(f[0].f_code.co_filename)]
    if mine:
        frame, lineno = mine[-1]
        filename, function = frame.f_code.co_filename, frame.f_code.co_name
        in_model = _module_frame(frames, model) is not None
        return UserCodeError(
            f"your code raised in {display_path(filename)}:{lineno} (in {function}): "
            f"{one_line(exc)}{shape if in_model else ''}",
            exc,
            filename,
            lineno,
            function,
        )
    # No user frame: did the error come out of torch code called with the user's model/data?
    ours = [i for i, (f, _) in enumerate(frames) if is_gradmedic_file(f.f_code.co_filename)]
    last_ours = ours[-1] if ours else -1
    after = frames[last_ours + 1 :]
    if not after or not all(is_torch_file(f.f_code.co_filename) for f, _ in after):
        return None  # raised in gradmedic itself, or in a library gradmedic called
    origin = f" from {source}" if source else ""
    layer = _module_frame(after, model)
    if layer is not None:
        message = f"your model{origin} raised in {layer}: {one_line(exc)}{shape}"
    else:
        message = f"torch raised on your model{origin} or its data: {one_line(exc)}{shape}"
    return UserCodeError(message, exc)
