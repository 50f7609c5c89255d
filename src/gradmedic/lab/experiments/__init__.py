"""One module per experiment; :func:`load_all` imports (and so registers) them all.

Adding an experiment is one new file in this package with an ``@experiment``
function: nothing else to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
import traceback


def load_all() -> dict[str, str]:
    """Import every module of this package.

    A module that fails to import does not stop the others.

    Returns:
        ``{module name: traceback}`` for the modules that failed to import.
    """
    failed: dict[str, str] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        full = f"{__name__}.{info.name}"
        try:
            importlib.import_module(full)
        except Exception:  # reported by the runner as a failed experiment
            failed[info.name] = traceback.format_exc()
    return failed
