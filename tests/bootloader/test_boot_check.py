"""`obelisk boot check [--dry-run]`: the image's real health-check script (obelisk-boot-check), run here with
hook folders of the test's own; a dry run says healthy or why not, and marks, records and reboots nothing.
(No systemd runs on this test machine, so the failed-unit and boot-job checks are proven in the VM tests.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from testlib import OBELISK, REPO

SCRIPT = REPO / "images/files/common/usr/lib/obelisk/obelisk-boot-check"
pytestmark = pytest.mark.timeout(60)


def _hook(d: Path, name: str, body: str) -> None:
    d.mkdir(exist_ok=True)
    (d / name).write_text("#!/bin/sh\n" + body + "\n")
    (d / name).chmod(0o755)


def _check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OBELISK, "boot", "check", "--script", str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=50)


def test_dry_run_of_healthy_hooks_says_it_would_mark_good(tmp_path: Path) -> None:
    _hook(tmp_path / "a", "10-ok", "echo app is up")
    r = _check("--dry-run", "--hooks-dir", tmp_path / "a")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "app is up" in r.stdout and "OBELISK-HEALTH-DRY-RUN: healthy" in r.stdout
    assert "OBELISK-BOOT-GOOD" not in r.stdout and "OBELISK-HEALTH-FAIL" not in r.stdout


def test_dry_run_names_the_failing_hook_and_its_last_lines(tmp_path: Path) -> None:
    _hook(tmp_path / "a", "10-ok", "true")
    _hook(tmp_path / "b", "20-db", "echo connecting; echo 'db is not reachable' >&2; exit 3")
    _hook(tmp_path / "b", "30-never", "touch " + str(tmp_path / "ran"))
    (tmp_path / "b" / "40-not-executable").write_text("exit 1\n")
    r = _check("--dry-run", "--hooks-dir", tmp_path / "a", "--hooks-dir", tmp_path / "b")
    assert r.returncode == 1
    assert ("OBELISK-HEALTH-DRY-RUN: unhealthy: health hook 20-db failed (exit 3): connecting db is not reachable"
            in r.stdout), r.stdout
    assert "OBELISK-HEALTH-FAIL" not in r.stdout and not (tmp_path / "ran").exists()  # the first failure ends it


def test_not_on_an_obelisk_host_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([OBELISK, "boot", "check", "--dry-run", "--script", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=50)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "obelisk host" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2 and "Traceback" not in r.stderr
