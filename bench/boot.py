"""Boot times per VM scenario (default images/base.toml), against a direct-kernel boot baseline.

    .venv/bin/python -m bench boot                              # builds images/base.toml, all scenarios
    .venv/bin/python -m bench boot --release out/base/0.1.0 --scenario boot --scenario update
    .venv/bin/python -m bench boot --definition images/tiny.toml --cache ~/.cache/obelisk

The baseline boots the same slot's kernel and initramfs straight from QEMU (``-kernel/-initrd``,
no OVMF, no GRUB) on a copy of the same disk, to the same "marked good" marker; the ratio is the
cost of the firmware + GRUB + grubenv chain. Everything runs under TCG (see machine-facts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bootloader import grub
from builder.imagetest import qemu, scenarios
from obelisk.tools import require, run


def direct_boots(release: Path, work: Path, timeout: float) -> tuple[float, float]:
    """(first boot, a later boot): seconds to the GOOD marker with the kernel loaded by QEMU itself."""
    boot = work / "direct"
    shutil.rmtree(boot, ignore_errors=True)
    boot.mkdir(parents=True)
    run(["unsquashfs", "-q", "-n", "-d", boot / "x", release / "usr.img", "lib/obelisk/boot"])
    disk = boot / "disk.raw"
    run(["cp", "--sparse=always", release / "disk.raw", disk])
    return direct_boot(release, boot, disk, timeout), direct_boot(release, boot, disk, timeout)


def direct_boot(release: Path, boot: Path, disk: Path, timeout: float) -> float:
    meta = json.loads((release / "release.json").read_text())
    root_hash = meta.get("verity_root_hash") or meta.get("usr", {}).get("verity_root_hash")
    hash_offset = meta.get("hash_offset") or meta.get("usr", {}).get("hash_offset")
    # $A_hashoff first: $A_hash is its prefix.
    cmdline = (grub.cmdline("A").replace("$A_hashoff", str(hash_offset)).replace("$A_hash", str(root_hash))
               .replace("$obelisk_trial", "0"))
    argv = [require("qemu-system-x86_64"), "-accel", "tcg", "-machine", "q35", "-m", "768", "-nographic",
            "-nic", "none", "-no-user-config", "-nodefaults", "-serial", "stdio", "-no-reboot",
            "-kernel", str(boot / "x/lib/obelisk/boot/vmlinuz"), "-initrd", str(boot / "x/lib/obelisk/boot/initrd.img"),
            "-append", cmdline, "-drive", f"file={disk},format=raw,if=virtio"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: list[bytes] = []
    try:
        assert proc.stdout is not None
        with open(boot / "console.log", "wb") as log:
            for raw in proc.stdout:
                log.write(raw)
                tail = (tail + [raw])[-5:]
                if qemu.GOOD.encode() in raw:
                    return time.monotonic() - t0
                if time.monotonic() - t0 > timeout:
                    break
    finally:
        proc.kill()
        proc.wait()
    last = b" | ".join(t.strip() for t in tail).decode(errors="replace")[-300:]
    raise RuntimeError(f"direct-kernel boot of {release} did not reach {qemu.GOOD} within {timeout:.0f}s "
                       f"(qemu exit {proc.returncode}; last output: {last})")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench boot")
    ap.add_argument("--definition", type=Path, default=Path("images/base.toml"))
    ap.add_argument("--release", type=Path, help="an existing release folder (default: build --definition)")
    ap.add_argument("--scenario", action="append", choices=list(scenarios.SCENARIOS))
    ap.add_argument("--boot-timeout", type=float, default=600.0)
    ap.add_argument("--cache", type=Path, help="stage cache for the builds (default: the builder's)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="obelisk-bench-boot-"))
    release = args.release
    if release is None:
        t0 = time.monotonic()
        release = scenarios.build_release(args.definition, tmp / "out", _version(args.definition), None, print,
                                          args.cache)
        print(f"built {release} in {time.monotonic() - t0:.1f}s")
    work = release / "test"
    work.mkdir(exist_ok=True)
    first_base, baseline = direct_boots(release, work, args.boot_timeout)
    print(f"baseline direct-kernel boot (no OVMF/GRUB) to marked good: first boot {first_base:.1f}s, "
          f"later boot {baseline:.1f}s")
    built: dict[str, Path] = {}
    meta = json.loads((release / "release.json").read_text())

    def next_release() -> Path:
        if "next" not in built:
            built["next"] = scenarios.build_release(args.definition, work / "releases/next",
                                                    scenarios.bump_version(meta["version"]), None, print, args.cache)
        return built["next"]

    def broken_release() -> Path:
        if "broken" not in built:
            d = scenarios.broken_definition(args.definition, work / "broken-def")
            built["broken"] = scenarios.build_release(d, work / "releases/broken",
                                                      scenarios.bump_version(meta["version"]), None, print, args.cache)
        return built["broken"]

    ctx = scenarios.Context(release=release, work=work, boot_timeout=args.boot_timeout, next_release=next_release,
                            broken_release=broken_release, obelisk=scenarios.obelisk_cmd(), log=print)
    for name in args.scenario or list(scenarios.SCENARIOS):
        out = scenarios.run_scenario(ctx, name)
        print(out.line())
        for i, b in enumerate(out.boots):
            if b.good:
                # Only the boot scenario's first boot does the first-boot work (grow ROOT, new GUID).
                base = first_base if name == "boot" and i == 0 else baseline
                print(f"  {name}: slot {b.slot}{' trial' if b.trial else ''} boot to marked good {b.seconds:.1f}s "
                      f"= {b.seconds / base:.2f}x the direct-kernel baseline ({base:.1f}s)")
    shutil.rmtree(tmp, ignore_errors=True)


def _version(definition: Path) -> str:
    import tomllib

    return tomllib.loads(definition.read_text()).get("version", "0.1.0")
