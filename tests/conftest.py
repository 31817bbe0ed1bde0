"""Shared test helpers. Area-specific fixtures live in each tests/<area>/conftest.py.

Deadlines: every test gets one that fits its kind (below) unless it names its own with
``@pytest.mark.timeout(N)``; the 1200 s in pyproject.toml is only the last resort. A hang then
fails fast with pytest-timeout's stack dump instead of holding CI for 20 minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testlib import OBELISK

TESTS = Path(__file__).resolve().parent

# Default deadline (seconds) per kind of test, for tests that do not set their own.
DEADLINE_VM = 900      # a TCG boot of the base image takes 1.5-2 min; scenarios boot several times
DEADLINE_BUILD = 600   # a cold tiny build is ~40 s, a python-stage build several minutes on a busy machine
DEADLINE_ETCD = 300    # real etcd clusters: start, prove healthy, lock, kill, stop
DEADLINE_UNIT = 180    # everything else: real tools and loopback servers, no VM


def _kind(item: pytest.Item) -> str:
    rel = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
    if rel[0] == "vm":
        return "vm"
    if "etcd" in item.keywords:
        return "etcd"
    if rel[0] == "builder":
        return "build"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    deadlines = {"vm": DEADLINE_VM, "build": DEADLINE_BUILD, "etcd": DEADLINE_ETCD, "unit": DEADLINE_UNIT}
    for item in items:
        kind = _kind(item)
        if kind == "vm" and "vm" not in item.keywords:
            item.add_marker(pytest.mark.vm)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(deadlines[kind]))


@pytest.fixture
def obelisk_bin() -> str:
    return OBELISK


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests away from the user's real cache and data directories."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("XDG_DATA_HOME", os.fspath(base / "xdg-data"))
    # `obelisk update serve` keeps fleet state there by default: one folder per test, never shared.
    monkeypatch.setenv("XDG_STATE_HOME", os.fspath(tmp_path_factory.mktemp("xdg-state")))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    if "OBELISK_TEST_CACHE" not in os.environ:
        monkeypatch.setenv("XDG_CACHE_HOME", os.fspath(base / "xdg-cache"))
