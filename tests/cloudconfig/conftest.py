"""Fixtures for cloud-config tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from cloudconfig_helpers import make_root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "root")
