"""The first-boot unit obelisk-ignition.service: systemd accepts it, it runs once and before the units it
configures, and the command it runs is one `obelisk cloudconfig apply` takes."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from test_ignition_support import fresh_root, ign
from typer.testing import CliRunner

from cloudconfig import ignition
from cloudconfig.cli import app

pytestmark = pytest.mark.timeout(60)
UNITS = Path(__file__).parents[2] / "images/files/common/usr/lib/systemd/system"
UNIT = UNITS / "obelisk-ignition.service"


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp


def test_it_runs_once_early_and_stops_the_boot_on_failure() -> None:
    u = _unit()
    assert u["Unit"]["ConditionPathExists"] == "!" + ignition.MARKER
    assert u["Unit"]["DefaultDependencies"] == "no"
    text = UNIT.read_text()
    before = " ".join(ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("Before=")).split()
    assert {"basic.target", "obelisk-cloudconfig.service", "ssh.service", "sshd.service"} <= set(before)
    assert u["Unit"]["OnFailure"] == "emergency.target"
    assert u["Service"]["Type"] == "oneshot" and u["Service"]["SyslogIdentifier"] == "ignition"
    assert u["Service"]["StandardOutput"] == "journal+console"
    # enabled as the image builder enables every overlay unit: WantedBy= in [Install]
    assert u["Install"]["WantedBy"] == "basic.target"


def test_its_command_is_one_apply_takes(tmp_path: Path) -> None:
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    assert argv[:3] == ["/usr/bin/obelisk", "cloudconfig", "apply"] and "--ignition-only" in argv
    root = fresh_root(tmp_path)
    seed = tmp_path / "seed"
    seed.mkdir()
    runner = CliRunner()
    sources = ["--root", str(root), "--datasource", "nocloud", "--nocloud", str(seed)]
    (seed / "meta-data").write_text("instance-id: i-1\n")
    (seed / "user-data").write_text("#cloud-config\nhostname: later\n")
    cc = runner.invoke(app, [*argv[2:], *sources])  # left to obelisk-cloudconfig.service
    assert cc.exit_code == 0 and "nothing to do (--ignition-only)" in cc.stderr
    assert (root / "etc/hostname").read_text() == "localhost\n"
    (seed / "user-data").write_bytes(ign(storage={"files": [{"path": "/etc/first-boot", "contents": {
        "source": "data:,yes"}}]}))
    res = runner.invoke(app, [*argv[2:], *sources])
    assert res.exit_code == 0, res.output
    assert (root / "etc/first-boot").read_text() == "yes" and ignition.provisioned_by_ignition(root)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """In a root that has the units and an executable /usr/bin/obelisk (this machine has no obelisk there)."""
    units = tmp_path / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    for f in UNITS.glob("*.service"):
        shutil.copy(f, units / f.name)
    obelisk = tmp_path / "usr/bin/obelisk"
    obelisk.parent.mkdir(parents=True)
    obelisk.write_text("#!/bin/sh\n")
    os.chmod(obelisk, 0o755)
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}", UNIT.name],
                         capture_output=True, text=True, timeout=30, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert res.returncode == 0 and res.stderr == "", res.stderr
