"""Shared test settings: one thread (CI has 2 cores), deterministic seeds, browser gating."""

from __future__ import annotations

import os
import shutil

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def in_ci() -> bool:
    """Whether the ``CI`` environment variable is set to a true value (``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def require_chromium() -> str:
    """The headless Chromium binary; skip without it locally, but fail under ``CI=true``."""
    path = find_chromium()
    if path is None:
        names = ", ".join(CHROMIUM_NAMES)
        if in_ci():
            pytest.fail(
                f"headless Chromium is required in CI (CI={os.environ.get('CI')!r}) but none of "
                f"{names} is on PATH; install it (apt-get install chromium)",
                pytrace=False,
            )
        pytest.skip(f"headless Chromium not installed ({names}); apt-get install chromium")
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Every browser-marked test needs Chromium: a missing one is a skip locally, a failure in CI.
    if item.get_closest_marker("browser") is not None:
        require_chromium()


@pytest.fixture
def chromium() -> str:
    return require_chromium()
