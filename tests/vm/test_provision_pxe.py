"""End to end: `obelisk provision serve` hands a host its iPXE script, kernel and initrd, and they boot.

The test plays iPXE against the real server (uvicorn on loopback) serving a copy of
examples/provision with `--assets` on a real `obelisk image build --format raw,pxe` release of
images/tiny.toml (the session fixture of pxeboot.py, shared with test_pxe.py): it fetches
/boot.ipxe, expands the chain URL with the iPXE settings of one machine (the MAC the example's
node1 group selects), fetches that host's script, downloads the kernel and initrd the script names
over HTTP, expands the iPXE variables left in the kernel arguments the way iPXE would, and boots
exactly that in QEMU (direct kernel boot; no disk, no NIC). The host must reach its marker, and
the command line its kernel saw must carry the cloud-config URL for its own MAC, whose
cloud-config the server renders and `obelisk cloudconfig validate` accepts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import pytest
import requests
from pxeboot import BOOTED, Release, qemu_boot
from testlib import OBELISK, REPO, say

MAC = "52:54:00:12:34:56"  # what examples/provision/groups/node1.json selects
UUID = "8c1f3a52-6b0e-4c1d-9a57-5e2d0b1e0c01"
SERIAL = "OBELISK E2E-1"  # a space: ${serial:uristring} must encode it
# The settings a BIOS/UEFI iPXE on that machine would expand; unset ones (hostname, domain without
# DHCP options 12/15) expand to nothing.
IPXE_SETTINGS = {"mac": MAC, "uuid": UUID, "serial": SERIAL, "buildarch": "x86_64", "hostname": "", "domain": ""}
_SETTING = re.compile(r"\$\{(?:net\d+/)?([A-Za-z0-9_.-]+)(?::([a-z0-9]+))?\}")


def prov_helpers() -> ModuleType:
    """tests/provision/prov_helpers.py (start/stop of the real server); that folder is not on sys.path
    when only tests/vm runs."""
    mod = sys.modules.get("prov_helpers")
    if mod is None:
        spec = importlib.util.spec_from_file_location("prov_helpers", REPO / "tests" / "provision" / "prov_helpers.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["prov_helpers"] = mod
        spec.loader.exec_module(mod)
    return mod


def ipxe_expand(text: str, settings: dict[str, str]) -> str:
    """iPXE's ${name[:type]} expansion for the settings and types the boot scripts use."""
    def sub(m: re.Match) -> str:
        name, kind = m.group(1), m.group(2)
        value = settings.get(name, "")
        if kind == "hexhyp":
            return value.replace(":", "-")
        if kind == "hexraw":
            return value.replace(":", "")
        if kind == "uristring":
            return quote(value, safe="-_.~")
        assert kind in (None, "string", "hex", "uuid"), f"setting type {kind!r} not modelled"
        return value
    return _SETTING.sub(sub, text)


def parse_ipxe(script: str) -> tuple[str, list[str], list[str]]:
    """An /ipxe answer → (kernel URL, kernel arguments, initrd URLs); it must end in `boot`."""
    lines = [ln for ln in script.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert script.startswith("#!ipxe\n"), script
    kernel = [ln.split() for ln in lines if ln.split()[0] == "kernel"]
    initrds = [ln.split()[1] for ln in lines if ln.split()[0] == "initrd"]
    assert len(kernel) == 1 and initrds and lines[-1].strip() == "boot", script
    assert {ln.split()[0] for ln in lines} == {"kernel", "initrd", "boot"}, script
    return kernel[0][1], kernel[0][2:], initrds


def download(url: str, dest: Path) -> str:
    """GET url into dest; the sha256 of what arrived."""
    h = hashlib.sha256()
    with requests.get(url, stream=True, timeout=60) as r, open(dest, "wb") as f:
        r.raise_for_status()
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


@pytest.mark.vm
def test_ipxe_script_for_a_mac_boots_the_release(release: Release, tmp_path: Path,
                                                  pytestconfig: pytest.Config) -> None:
    ph = prov_helpers()
    data = ph.copy_example(tmp_path / "data")
    assert not (data / "assets").exists()
    served = ph.start(data, tmp_path / "serve.log", "--assets", str(release.out))
    try:
        # 1. The firmware's first script, and the chain URL iPXE builds from it.
        r = served.get("/boot.ipxe")
        assert r.status_code == 200, r.text
        chain = [ln.split(None, 1)[1] for ln in r.text.splitlines() if ln.startswith("chain ")]
        assert r.text.startswith("#!ipxe\n") and len(chain) == 1, r.text
        url = urljoin(served.url + "/boot.ipxe", ipxe_expand(chain[0], IPXE_SETTINGS))
        assert "${" not in url, url
        query = parse_qs(urlsplit(url).query)
        assert query["mac"] == ["52-54-00-12-34-56"] and query["uuid"] == [UUID], url
        assert query["serial"] == [SERIAL] and query["arch"] == ["x86_64"], url

        # 2. The host's own script: kernel, arguments, initrd.
        r = requests.get(url, timeout=10)
        assert r.status_code == 200, f"{url}: {r.status_code} {r.text}"
        kernel_url, args, initrd_urls = parse_ipxe(r.text)
        base = f"{served.url}/assets/tiny/{release.version}"
        assert kernel_url == f"{base}/vmlinuz" and initrd_urls == [f"{base}/initrd"], r.text
        assert f"obelisk.usrhash={release.root_hash}" in args, args
        assert f"obelisk.usrhashoffset={release.hash_offset}" in args, args

        # 3. Kernel and initrd over HTTP, byte for byte the release's (SHA256SUMS and release.json).
        sums = dict(reversed(ln.split()) for ln in (release.path / "SHA256SUMS").read_text().splitlines())
        meta = json.loads((release.path / "release.json").read_text())
        kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
        for src, dest in ((kernel_url, kernel), (initrd_urls[0], initrd)):
            digest = download(src, dest)
            assert digest == sums[dest.name] == meta["artifacts"][dest.name]["sha256"], dest.name

        # 4. iPXE expands what the server left for it (${mac:hexhyp}) when it runs `kernel`.
        cmdline = " ".join(ipxe_expand(a, IPXE_SETTINGS) for a in args)
        cloud_url = f"{served.url}/cloud?mac=52-54-00-12-34-56"
        assert "${" not in cmdline and f"cloud-config-url={cloud_url}" in cmdline.split(), cmdline

        # 5. The host's cloud-config: node1's, valid.
        r = requests.get(cloud_url, timeout=10)
        assert r.status_code == 200, r.text
        assert 'hostname: "node1"' in r.text and "role=etcd" in r.text, r.text
        (tmp_path / "node1.yaml").write_text(r.text)
        res = subprocess.run([OBELISK, "cloudconfig", "validate", str(tmp_path / "node1.yaml")],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        ph.stop(served.proc)

    # 6. Boot exactly that: the downloaded files, the script's command line; the machine's SMBIOS
    # UUID and serial are the ones "iPXE" reported.
    log = tmp_path / "pxe-provision.log"
    boot = qemu_boot(kernel, initrd, cmdline, log,
                     extra=["-uuid", UUID, "-smbios", f"type=1,serial={SERIAL}"])
    say(pytestconfig, f"provisioned PXE boot of tiny {release.version} for {MAC}: {boot.exit} in "
                      f"{boot.seconds:.1f}s (log {log})")
    assert boot.exit == "booted", f"{boot.exit}; see {log}"
    # The command line the guest's kernel saw is the script's, with the cloud-config URL for its MAC.
    seen = [ln.split("Kernel command line: ", 1)[1].strip() for ln in boot.log.splitlines()
            if "Kernel command line: " in ln]
    assert seen == [cmdline], (seen, cmdline)
    assert f"cloud-config-url={cloud_url}" in seen[0].split()
    assert any("OBELISK-PXE-USR: /dev/loop" in ln and "verity=verified" in ln for ln in boot.log.splitlines()), log
    assert f"{BOOTED} version={release.version}" in boot.log
