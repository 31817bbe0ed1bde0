"""The fleet end to end, in real VMs: `obelisk image test RELEASE -s fleet --hosts N` on images/base.toml.

N hosts (QEMU TCG) on a private network namespace form their own etcd, roll the next release one at a
time under the etcd lock, and stop a broken one by themselves (builder/imagetest/fleet.py checks it all
itself). It runs for most of an hour on a 2-core machine, longer than CI's budget allows beside the rest
of the suite, so it runs only when asked: `make fleet-test` (3 hosts) or OBELISK_FLEET_HOSTS=N.
Needs root (network namespaces, taps). OBELISK_TEST_CACHE reuses a stage cache for the three builds.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from testlib import OBELISK, REPO, need_tools, say

from builder.imagetest import scenarios

BASE = REPO / "images" / "base.toml"
HOSTS = os.environ.get("OBELISK_FLEET_HOSTS", "")


@pytest.mark.vm
@pytest.mark.timeout(3 * 3600)
@pytest.mark.skipif(not HOSTS, reason="the fleet run takes most of an hour: make fleet-test (OBELISK_FLEET_HOSTS=N)")
def test_fleet_scenario(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> None:
    need_tools("qemu-system-x86_64", "mmdebstrap", "mksquashfs", "veritysetup", "ssh", "ssh-keygen", "etcdctl",
               "mkfs.fat", "mcopy", "unsquashfs", "ip", "curl")
    out = tmp_path_factory.mktemp("fleet-release")
    subprocess.run([OBELISK, "key", "generate", str(out / "key")], check=True, capture_output=True)
    key = out / "key" / "obelisk.key"
    cache = Path(os.environ.get("OBELISK_TEST_CACHE") or out / "cache")

    def log(line: str) -> None:
        say(pytestconfig, line)

    release = scenarios.build_release(BASE, out / "rel", "0.1.0", key, log, cache)
    work = release / "test"
    work.mkdir()
    built: dict[str, Path] = {}

    def next_release() -> Path:
        if "next" not in built:
            built["next"] = scenarios.build_release(BASE, work / "releases/next", "0.1.1", key, log, cache)
        return built["next"]

    def broken_release() -> Path:
        if "broken" not in built:
            d = scenarios.broken_definition(BASE, work / "broken-def")
            built["broken"] = scenarios.build_release(d, work / "releases/broken", "0.1.2", key, log, cache)
        return built["broken"]

    ctx = scenarios.Context(release=release, work=work, boot_timeout=600.0, next_release=next_release,
                            broken_release=broken_release, obelisk=[OBELISK], log=log, signing_key=key,
                            hosts=int(HOSTS))
    result = scenarios.run_scenario(ctx, "fleet")
    log(result.line())
    assert result.ok, f"{result.line()}\nlogs, fleet.json and timeline.svg under {work / 'fleet'}"
