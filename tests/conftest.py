"""Shared test helpers. Area-specific fixtures live in each tests/<area>/conftest.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OBELISK = str(Path(sys.executable).with_name("obelisk"))


def need_tools(*tools: str) -> None:
    """Fail (not skip) when a system tool is missing: `make setup` installs them all."""
    missing = [t for t in tools if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
    if missing:
        pytest.fail(f"missing tools {missing}: run 'make setup'")


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
