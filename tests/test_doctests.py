"""Every ``>>>`` example in the gradmedic sources runs, as part of the default ``pytest``.

The examples are collected with :mod:`doctest` from the *imported* package
(``gradmedic.__path__``), under each module's real dotted name. That is more
robust than ``--doctest-modules``, which imports files by path: it would give the
modules of the namespace package ``gradmedic.probes`` (no ``__init__.py``) bare
names such as ``recurrent``, put ``src/gradmedic/probes`` on ``sys.path``, and
break outright against a non-editable install.

Only modules whose source contains an example are imported, so slow or heavy
modules without examples (``lab.experiments``, the integrations) cost nothing.
Each example runs with torch seeded (``conftest._seed``) in a fresh temporary
working directory. The option flags match pytest's doctest default (``ELLIPSIS``).
"""

from __future__ import annotations

import doctest
import importlib
import io
import re
from pathlib import Path

import pytest

import gradmedic

PACKAGE_DIR = Path(gradmedic.__path__[0])
EXAMPLE_LINE = re.compile(r"^\s*>>> ", re.MULTILINE)
OPTIONFLAGS = doctest.ELLIPSIS


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules_with_examples() -> list[str]:
    return sorted(
        _module_name(p)
        for p in PACKAGE_DIR.rglob("*.py")
        if EXAMPLE_LINE.search(p.read_text(encoding="utf-8"))
    )


MODULES = _modules_with_examples()


def _doctests(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    tests = doctest.DocTestFinder().find(module, module_name)
    return sorted((t for t in tests if t.examples), key=lambda t: t.name)


def _params() -> list:
    params = []
    for name in MODULES:
        try:
            tests = _doctests(name)
        except Exception as exc:  # reported by the test below, not as a collection error
            params.append(pytest.param(name, None, exc, id=f"{name}[import]"))
            continue
        params += [pytest.param(name, t, None, id=t.name) for t in tests]
    return params


PARAMS = _params()


@pytest.mark.parametrize(("module_name", "test", "import_error"), PARAMS)
def test_doctest(module_name, test, import_error, tmp_path, monkeypatch) -> None:
    if import_error is not None:
        raise AssertionError(f"importing {module_name} failed: {import_error!r}") from import_error
    monkeypatch.chdir(tmp_path)  # examples may write files
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS, verbose=False)
    result = runner.run(test, out=out.write)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed:\n" + (
        out.getvalue()
    )


def test_every_module_with_examples_is_collected() -> None:
    """A module whose source has ``>>>`` lines yields doctests (none silently dropped)."""
    assert len(MODULES) > 20, MODULES
    collected = {p.values[0] for p in PARAMS if p.values[1] is not None}
    missing = [m for m in MODULES if m not in collected]
    assert not missing, f"'>>>' examples in {missing} are not found by doctest"
    n_lines = sum(
        len(EXAMPLE_LINE.findall(p.read_text(encoding="utf-8"))) for p in PACKAGE_DIR.rglob("*.py")
    )
    n_examples = sum(len(p.values[1].examples) for p in PARAMS if p.values[1] is not None)
    assert n_examples == n_lines, f"{n_lines} '>>>' lines but {n_examples} doctest examples"
