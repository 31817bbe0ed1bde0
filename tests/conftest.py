"""Shared test helpers. Area-specific fixtures live in each tests/<area>/conftest.py."""

from __future__ import annotations

import os

import pytest
from testlib import OBELISK


@pytest.fixture
def obelisk_bin() -> str:
    return OBELISK


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests away from the user's real cache and data directories."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("XDG_DATA_HOME", os.fspath(base / "xdg-data"))
    if "OBELISK_TEST_CACHE" not in os.environ:
        monkeypatch.setenv("XDG_CACHE_HOME", os.fspath(base / "xdg-cache"))
