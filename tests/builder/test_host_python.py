"""What the python stage ships into an image: the host commands and what they import, nothing else.

The file set comes from ``builder.stages.python.host_files`` (what the stage copies before pip
installs it; pip itself is not run here: it needs the network for the dependencies). The host
commands are then run from a folder holding only those files, with the interpreter's own site
handling off (``-S``), so nothing of the checkout's editable install can fill a gap.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from bhelpers import REPO

from builder.stages import python as python_stage

PURELIB = sysconfig.get_paths()["purelib"]  # typer, rich, pydantic... (not obelisk: its editable finder is a .pth)


def test_host_files_leave_out_the_builder_provisioning_and_tests() -> None:
    files = python_stage.host_files()
    tops = collections.Counter(f.split("/")[0] for f in files)
    print("host files by package:", dict(sorted(tops.items())))
    assert "provision" not in tops and "tests" not in tops
    assert "builder" not in tops, [f for f in files if f.startswith("builder/")]
    for needed in ("obelisk/cli.py", "bootloader/cli.py", "update_engine/cli.py", "update_engine/reboot/cli.py",
                   "update_engine/reboot/coordinator.py", "update_engine/reboot/identity.py",
                   "cloudconfig/cli.py", "update_engine/daemon.py", "bootloader/slots.py", "obelisk/keycli.py"):
        assert needed in files, needed
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def _host_dir(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    for rel in python_stage.host_files():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, site / rel)
    return site


def _host(site: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    code = "import sys; sys.argv[0] = 'obelisk'; from obelisk.cli import main; main()"
    env = {"PYTHONPATH": f"{site}:{PURELIB}", "PATH": os.environ["PATH"], "COLUMNS": "200", "HOME": str(site)}
    return subprocess.run([sys.executable, "-S", "-c", code, *map(os.fspath, args)], cwd=site, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(600)
def test_the_host_commands_run_from_the_shipped_files_alone(tmp_path: Path) -> None:
    site = _host_dir(tmp_path)
    gone = subprocess.run([sys.executable, "-S", "-c", "import builder.build"], env={"PYTHONPATH": f"{site}:{PURELIB}"},
                          cwd=site, capture_output=True, text=True, timeout=60)
    assert gone.returncode != 0 and "No module named 'builder'" in gone.stderr
    top = _host(site, "--help")
    assert top.returncode == 0, top.stderr
    for name in python_stage.HOST_COMMANDS:
        assert f" {name} " in top.stdout, name
        sub = _host(site, name, "--help")
        assert sub.returncode == 0, (name, sub.stderr)
    assert " image " not in top.stdout and " provision " not in top.stdout
    # Names a package loads on first use (update_engine.reboot's __getattr__) come from the shipped files
    # too: the daemon's etcd-lock reboot imports coordinator_from_config that way (a fleet run found a host
    # image without update_engine/reboot/coordinator.py: it never rebooted).
    from update_engine import reboot

    lazy = subprocess.run([sys.executable, "-S", "-c", f"from update_engine.reboot import {', '.join(reboot.__all__)}"],
                          env={"PYTHONPATH": f"{site}:{PURELIB}"}, cwd=site, capture_output=True, text=True, timeout=60)
    assert lazy.returncode == 0, lazy.stderr
    # `key verify`, as the image test hook runs it on a host.
    keys = tmp_path / "k"
    assert _host(site, "key", "generate", keys).returncode == 0
    doc = tmp_path / "run.sh"
    doc.write_text("echo hi\n")
    assert _host(site, "key", "sign", doc, "--key", keys / "obelisk.key").returncode == 0
    ok = _host(site, "key", "verify", doc, "--key", keys / "obelisk.pub")
    assert ok.returncode == 0 and "signed by" in ok.stdout, ok.stderr
