"""Helpers shared by test areas (import as `from testlib import ...`; conftest modules are not importable)."""

from __future__ import annotations

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


def say(config: pytest.Config | None, line: str) -> None:
    """Print past pytest's capture (boot times and the like belong in CI's output)."""
    capman = config.pluginmanager.getplugin("capturemanager") if config else None
    if capman is None:
        print(f"[vm] {line}")
        return
    with capman.global_and_fixture_disabled():
        sys.stdout.write(f"\n[vm] {line}\n")
        sys.stdout.flush()
