"""Every ```python block in the README and docs/ runs (blocks of one file share a namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path: Path, tmp_path, monkeypatch) -> None:
    blocks = BLOCK.findall(path.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)  # examples may write files (run.jsonl, reports)
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{path.name} block {i} failed: {exc!r}\n{code}") from exc


def test_readme_example_finds_vanishing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))[0]
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["diagnosis"].findings[0].problem.value == "vanishing"
