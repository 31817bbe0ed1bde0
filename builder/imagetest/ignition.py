"""The ``ignition`` scenario: the default image provisioned by an Ignition config on a config drive.

A first VM boots a fresh copy of the disk with an Ignition 3.4.0 config on a config drive (FAT, label
``config-2``, ``openstack/latest/user_data``): core's SSH key, a directory, a file from a ``data:`` URL with
its mode and owner, a symlink, and a unit that is enabled and runs. The first boot applies it (key login
works, each file is as the config says, the unit ran, the result file exists); the user then changes the
file, and after a reboot Ignition did not run again (its unit's condition failed, the file keeps the
user's change, the result file is the same). A second VM boots with a config that is valid JSON but not a
valid Ignition config: its first boot stops in emergency mode with the one error line on the console,
and sshd never starts (no half-configured host on the network).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from builder.imagetest.host import GOOD, expect, ssh_key
from builder.imagetest.hostvm import GuestVm
from obelisk.tools import require, run

UNIT_MARK = "OBELISK-IGNITION: unit from Ignition ran"
FILE = "/etc/obelisk-ignition/greeting"
FILE_TEXT = "provisioned by Ignition\n"
LINK = "/etc/obelisk-ignition/current"
# What obelisk-ignition.service prints (SyslogIdentifier=ignition) when a config is refused.
REFUSED = r"ignition\[\d+\]: .*nothing was changed"


class Context(Protocol):
    release: Path
    work: Path
    boot_timeout: float
    log: Callable[[str], None]

    def fresh_disk(self, name: str, *, grow: int = 0, first_boot: bool = False) -> Path: ...


def good_config(pubkey: str) -> dict:
    unit = ("[Unit]\nDescription=a unit from Ignition\n[Service]\nType=oneshot\n"
            f"ExecStart=/bin/sh -c 'echo \"{UNIT_MARK}\" > /dev/console; touch /var/lib/obelisk-ignition-ran'\n"
            "[Install]\nWantedBy=multi-user.target\n")
    data = "data:text/plain;base64," + base64.b64encode(FILE_TEXT.encode()).decode()
    return {
        "ignition": {"version": "3.4.0"},
        "passwd": {"users": [{"name": "core", "sshAuthorizedKeys": [pubkey]}]},
        "storage": {
            "directories": [{"path": "/etc/obelisk-ignition", "mode": 0o750}],
            "files": [{"path": FILE, "mode": 0o640, "user": {"name": "core"}, "contents": {"source": data}}],
            "links": [{"path": LINK, "target": "greeting"}],
        },
        "systemd": {"units": [{"name": "obelisk-ignition-hello.service", "enabled": True, "contents": unit}]},
    }


def broken_config() -> dict:
    """Valid JSON, an Ignition config by its version, refused by validation (a relative path)."""
    return {"ignition": {"version": "3.4.0"},
            "storage": {"files": [{"path": "etc/not-absolute", "contents": {"source": "data:,x"}}]}}


def config_drive(dest: Path, user_data: str) -> Path:
    """A FAT image labelled config-2 with openstack/latest/user_data (OpenStack's config drive)."""
    src = dest.with_suffix(".d")
    shutil.rmtree(src, ignore_errors=True)
    latest = src / "openstack" / "latest"
    latest.mkdir(parents=True)
    (latest / "user_data").write_text(user_data)
    (latest / "meta_data.json").write_text(json.dumps({"uuid": dest.stem}))
    dest.unlink(missing_ok=True)
    run(["truncate", "-s", "2M", dest])
    run([require("mkfs.fat"), "-n", "config-2", dest])
    run([require("mmd"), "-i", dest, "::openstack", "::openstack/latest"])
    run([require("mcopy"), "-i", dest, latest / "user_data", latest / "meta_data.json", "::openstack/latest/"])
    return dest


def _stat(vm: GuestVm, path: str) -> str:
    return vm.ssh(f"sudo stat -c '%F %a %U:%G' {path}").stdout.strip()


def check_applied_once(ctx: Context, work: Path, key: Path, pubkey: str) -> dict[str, float]:
    times: dict[str, float] = {}
    disk = ctx.fresh_disk("ignition/vm1", first_boot=True)
    drive = config_drive(work / "vm1-config-2.img", json.dumps(good_config(pubkey)))
    with GuestVm(disk, work / "vm1.log", key, extra_disks=[drive]) as vm:
        i, line = vm.wait_for(GOOD, ctx.boot_timeout * 2)
        times["first boot to marked good"] = vm.lines[i][0]
        expect("HEALTH-FAIL" not in line, f"the Ignition-provisioned boot was not healthy: {line.strip()[:200]}")
        times["first boot to ssh"] = vm.wait_ssh(120)  # core's key came from Ignition only
        vm.wait_for(re.escape(UNIT_MARK), 120)
        expect(_stat(vm, "/etc/obelisk-ignition") == "directory 750 root:root",
               f"/etc/obelisk-ignition is {_stat(vm, '/etc/obelisk-ignition')}")
        expect(_stat(vm, FILE).startswith("regular file 640 core:"), f"{FILE} is {_stat(vm, FILE)}")
        expect(vm.ssh(f"sudo cat {FILE}").stdout == FILE_TEXT, f"{FILE} does not hold the config's contents")
        expect(vm.ssh(f"sudo readlink {LINK}").stdout.strip() == "greeting", f"{LINK} is not the config's symlink")
        enabled = vm.ssh("systemctl is-enabled obelisk-ignition-hello.service", check=False).stdout.strip()
        expect(enabled == "enabled", f"the unit from Ignition is {enabled!r}, not enabled")
        result = vm.ssh("sudo stat -c %Y /etc/.ignition-result.json", check=False)
        expect(result.returncode == 0, "the first boot left no /etc/.ignition-result.json")
        cc = vm.ssh("systemctl show -p ActiveState -p Result obelisk-ignition.service").stdout.split()
        expect("Result=success" in cc, f"obelisk-ignition.service: {cc}")
        # The user changes what Ignition wrote; a reboot must not put it back.
        vm.ssh(f"echo changed-by-the-user | sudo tee {FILE} >/dev/null")
        mark = len(vm.lines)
        vm.ssh("sudo systemctl reboot", check=False, timeout=30)
        i, line = vm.wait_for(GOOD, ctx.boot_timeout * 2, after=mark)
        times["reboot to marked good"] = vm.lines[i][0] - vm.lines[mark][0] if mark < len(vm.lines) else 0.0
        vm.wait_ssh(120)
        cond = vm.ssh("systemctl show -p ConditionResult -p ExecMainStartTimestampMonotonic "
                      "obelisk-ignition.service").stdout.split()
        expect("ConditionResult=no" in cond, f"obelisk-ignition.service ran again on the second boot: {cond}")
        expect(vm.ssh(f"sudo cat {FILE}").stdout.strip() == "changed-by-the-user",
               f"the second boot applied Ignition again: {FILE} lost the user's change")
        again = vm.ssh("sudo stat -c %Y /etc/.ignition-result.json").stdout.strip()
        expect(again == result.stdout.strip(), "the result file was rewritten on the second boot")
        vm.power_off()
    return times


def check_broken_stops_the_boot(ctx: Context, work: Path, key: Path) -> str:
    disk = ctx.fresh_disk("ignition/vm2", first_boot=True)
    drive = config_drive(work / "vm2-config-2.img", json.dumps(broken_config()))
    with GuestVm(disk, work / "vm2.log", key, extra_disks=[drive]) as vm:
        _, line = vm.wait_for(REFUSED, ctx.boot_timeout * 2)
        vm.wait_for(r"emergency mode|Emergency Mode|emergency\.target", 300)
        said = [ln for _, ln in vm.lines if "ignition[" in ln and ("error" in ln or "not-absolute" in ln)]
        expect(any("/storage/files/0/path" in ln for ln in said),
               f"the console does not name the bad field: {said[:3]}")
        good = [ln for _, ln in vm.lines if "OBELISK-BOOT-GOOD" in ln]
        expect(not good, "a boot whose Ignition config was refused was marked good")
        login = vm.ssh("true", check=False, timeout=60)
        expect(login.returncode != 0, "sshd answers on a host whose Ignition config was refused")
        vm.kill()
    return line.strip()[:200]


def scenario_ignition(ctx: Context) -> str:
    work = ctx.work / "ignition"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key, pubkey = ssh_key(work / "id_ed25519")
    times = check_applied_once(ctx, work, key, pubkey)
    refused = check_broken_stops_the_boot(ctx, work, key)
    ctx.log("  ignition: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return (f"applied on the first boot (key, directory, file, symlink, unit), not again on the second; "
            f"a broken config stopped the boot: {refused}")
