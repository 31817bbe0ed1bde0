"""The default image as a host, in a real VM: `obelisk image test RELEASE -s host` on images/base.toml.

Builds base from its definition (about 5 minutes cold on a 2-core machine; OBELISK_TEST_CACHE reuses a
stage cache), then boots it under QEMU TCG with user networking restricted to forwarded loopback ports
and checks SSH, podman, etcd, the lock, the health check, and a second host's identity (see
builder/imagetest/host.py). The same release then boots with an Ignition config on a config drive
(builder/imagetest/ignition.py): applied on the first boot, not again on the second, and a broken config
stops the boot. Per-step times are printed past pytest's capture.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from testlib import OBELISK, REPO, need_tools, say

from builder.imagetest import scenarios

BASE = REPO / "images" / "base.toml"


@pytest.fixture(scope="module")
def base_release(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> tuple[Path, Path]:
    """images/base.toml 0.1.0, built once for this module's scenarios: (release folder, signing key)."""
    out = tmp_path_factory.mktemp("host-release")
    subprocess.run([OBELISK, "key", "generate", str(out / "key")], check=True, capture_output=True)
    key = out / "key" / "obelisk.key"
    cache = Path(os.environ.get("OBELISK_TEST_CACHE") or out / "cache")
    release = scenarios.build_release(BASE, out / "rel", "0.1.0", key, lambda line: say(pytestconfig, line), cache)
    return release, key


def _run(name: str, base_release: tuple[Path, Path], pytestconfig: pytest.Config) -> None:
    release, key = base_release
    work = release / "test"  # each scenario writes its own folder in it
    work.mkdir(exist_ok=True)

    def log(line: str) -> None:
        say(pytestconfig, line)

    def no_more_builds() -> Path:
        raise AssertionError(f"the {name} scenario builds no other release")

    ctx = scenarios.Context(release=release, work=work, boot_timeout=600.0, next_release=no_more_builds,
                            broken_release=no_more_builds, obelisk=[OBELISK], log=log, signing_key=key)
    result = scenarios.run_scenario(ctx, name)
    log(result.line())
    assert result.ok, f"{result.line()}\nlogs under {work / name}"


@pytest.mark.vm
@pytest.mark.timeout(3600)
def test_host_scenario(base_release: tuple[Path, Path], pytestconfig: pytest.Config) -> None:
    need_tools("qemu-system-x86_64", "mmdebstrap", "mksquashfs", "veritysetup", "ssh", "ssh-keygen", "ssh-keyscan",
               "etcdctl", "mkfs.fat", "mcopy", "unsquashfs")
    _run("host", base_release, pytestconfig)


@pytest.mark.vm
@pytest.mark.timeout(2400)
def test_ignition_scenario(base_release: tuple[Path, Path], pytestconfig: pytest.Config) -> None:
    need_tools("qemu-system-x86_64", "ssh", "ssh-keygen", "mkfs.fat", "mcopy", "mmd")
    _run("ignition", base_release, pytestconfig)
