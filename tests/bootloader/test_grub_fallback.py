"""GRUB falls back to the other slot when the chosen slot's kernel or initrd does not load.

The whole grub.cfg that ``bootloader.grub.render_cfg`` generates runs under ``grub-emu`` (Debian's
GRUB 2.06, the same script engine as the EFI build) against a real disk image: a GPT, a FAT ESP
(mkfs.fat + mcopy) holding grub.cfg and the grubenv, and squashfs USR slots (mksquashfs, gzip)
that GRUB reads with its own part_gpt, fat and squash4. GRUB's ``save_env`` writes the grubenv on
that disk, and the test reads it back with ``bootloader.esp``.

One fake, because grub-emu has no Linux loader: ``linux`` and ``initrd`` are GRUB script functions
defined before grub.cfg is sourced. They succeed when GRUB can read the file (``test -f`` through
GRUB's own filesystem drivers); a successful ``initrd`` (the last step before ``boot``) prints the
fields of the command line ``linux`` was given and ends the run. Real kernels loading (and failing
to) are the VM test's part (``tests/vm/test_fallback_reasons.py``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from bootdisks import make_esp_disk
from testlib import need_tools

from bootloader import esp, grub, loader, slots
from obelisk.tools import run

pytestmark = pytest.mark.timeout(240)

EMU_MODULES = Path("/usr/lib/grub/x86_64-emu")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

STANDINS = r"""
function linux {
  if [ -f "$1" ]; then set emu_cmdline="$*"; return 0; fi
  echo "EMU-NO-FILE linux"
  return 1
}
function initrd {
  if [ ! -f "$1" ]; then echo "EMU-NO-FILE initrd"; return 1; fi
  regexp --set=1:emu_slot 'obelisk\.slot=([AB])' "$emu_cmdline"
  regexp --set=1:emu_trial 'obelisk\.trial=([01])' "$emu_cmdline"
  regexp --set=1:emu_lf 'obelisk\.loadfail=([^ ]*)' "$emu_cmdline"
  regexp --set=1:emu_ver 'obelisk\.version=([^ ]*)' "$emu_cmdline"
  echo "EMU-BOOT slot=$emu_slot trial=$emu_trial ver=$emu_ver lf=$emu_lf"
  reboot
}
"""


def _usr_image(tmp: Path, name: str, *, kernel: bool = True, initrd: bool = True) -> Path:
    tree = tmp / f"tree-{name}"
    boot = tree / "lib/obelisk/boot"
    boot.mkdir(parents=True)
    (tree / "lib/os-release").write_text(f"VERSION_ID={name}\n")
    if kernel:
        (boot / "vmlinuz").write_bytes(b"kernel " * 100)
    if initrd:
        (boot / "initrd.img").write_bytes(b"initrd " * 100)
    img = tmp / f"usr-{name}.sqfs"
    run(["mksquashfs", tree, img, "-comp", "gzip", "-noappend", "-no-progress", "-quiet", "-all-root"])
    return img


def _write_slot(disk: Path, index: int, img: Path | None) -> None:
    off, length = slots.slot_extent(disk, index)
    data = img.read_bytes() if img is not None else b""
    assert len(data) <= length
    with open(disk, "r+b") as f:
        f.seek(off)
        f.write(data.ljust(min(length, 1 << 20), b"\0"))


def _set(disk: Path, name: str, p: int, t: int, s: int) -> None:
    slots.set_attrs(disk, 3 if name == "A" else 4, priority=p, tries=t, successful=bool(s))


def _grub(tmp: Path, disk: Path) -> str:
    """Source the disk's grub.cfg in grub-emu; return its console output (ANSI and CR removed)."""
    need_tools("grub-emu", "mksquashfs", "mkfs.fat", "mcopy")
    if not EMU_MODULES.is_dir():
        pytest.fail("grub-emu modules missing: apt-get install grub-emu (make setup)")
    gdir = tmp / "grub"
    if not gdir.exists():
        shutil.copytree(EMU_MODULES, gdir / "x86_64-emu")
    (gdir / "grub.cfg").write_text(STANDINS + "set root=(hd0,gpt1)\nsource ($root)/EFI/obelisk/grub.cfg\n"
                                   'echo "EMU-CFG-RETURNED"\nreboot\n')
    devmap = tmp / "device.map"
    devmap.write_text(f"(hd0) {disk}\n")
    res = subprocess.run(["grub-emu", "-d", str(gdir), "-m", str(devmap)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, errors="replace", timeout=120)
    out = ANSI.sub("", res.stdout.replace("\r", ""))
    assert "EMU-BOOT" in out or "OBELISK-GRUB-FAIL" in out, out[-3000:] + res.stderr[-2000:]
    return out


def _booted(out: str) -> dict[str, str]:
    line = next(ln for ln in out.splitlines() if "EMU-BOOT" in ln)
    return dict(p.split("=", 1) for p in line[line.index("EMU-BOOT"):].split()[1:])


def _env(disk: Path) -> dict[str, str]:
    return grub.parse_env(esp.read_file(disk, grub.ENV_PATH))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    need_tools("mksquashfs", "mkfs.fat", "mcopy")
    d = make_esp_disk(tmp_path)
    _write_slot(d, 3, _usr_image(tmp_path, "a"))
    return d


def test_normal_boot_writes_nothing(tmp_path: Path, disk: Path) -> None:
    before = esp.read_file(disk, grub.ENV_PATH)
    out = _grub(tmp_path, disk)
    assert _booted(out) == {"slot": "A", "trial": "0", "ver": "1.0.0", "lf": ""}
    assert grub.MARK_FALLBACK not in out
    assert esp.read_file(disk, grub.ENV_PATH) == before  # a good boot does not write the env


def test_good_slot_without_kernel_falls_back_to_the_other_good_slot(tmp_path: Path, disk: Path) -> None:
    # B is good and on top, but its partition holds no filesystem: today's reboot loop.
    _set(disk, "B", 2, 0, 1)
    out = _grub(tmp_path, disk)
    assert "OBELISK-GRUB: cannot load kernel of slot B (B:linux:1.1.0)" in out
    assert "falling back to slot A" in out.replace("\n", "")
    assert _booted(out) == {"slot": "A", "trial": "0", "ver": "1.0.0", "lf": "B:linux:1.1.0"}
    assert _env(disk)[grub.LOADFAIL_VAR] == "B:linux:1.1.0"
    env = loader.read_env(disk)
    assert env is not None and env.loadfail == "B:linux:1.1.0"
    # The mark survives obelisk's own env rewrites (here: a GPT change mirrored into the env).
    _set(disk, "A", 1, 0, 1)
    slots.set_attrs(disk, 3, priority=1)
    slots.prioritize(disk, 4)
    assert _env(disk)[grub.LOADFAIL_VAR] == "B:linux:1.1.0"
    # B gets a kernel again (re-staged): it boots, and GRUB clears the mark.
    _write_slot(disk, 4, _usr_image(tmp_path, "b"))
    out = _grub(tmp_path, disk)
    assert _booted(out) == {"slot": "B", "trial": "0", "ver": "1.1.0", "lf": ""}
    assert _env(disk)[grub.LOADFAIL_VAR] == ""
    assert [(s.name, s.priority, s.tries, s.successful) for s in slots.read_slots(disk)] == \
        [("A", 1, 0, True), ("B", 2, 0, True)]


def test_trial_without_initrd_burns_its_try_and_falls_back(tmp_path: Path, disk: Path) -> None:
    _write_slot(disk, 4, _usr_image(tmp_path, "b", initrd=False))
    slots.stage_trial(disk, 4)
    out = _grub(tmp_path, disk)
    assert "EMU-NO-FILE initrd" in out
    assert _booted(out) == {"slot": "A", "trial": "0", "ver": "1.0.0", "lf": "B:initrd:1.1.0"}
    env = _env(disk)
    assert env["B_tries"] == "0" and env[grub.LOADFAIL_VAR] == "B:initrd:1.1.0"
    # obelisk takes the burned try into the GPT: B is no longer bootable, A boots next.
    assert slots.next_index(slots.read_slots(disk)) == 3


def test_no_other_slot_and_both_failing_end_in_the_fatal_marker(tmp_path: Path, disk: Path) -> None:
    _write_slot(disk, 3, None)  # A (the only bootable slot) has no kernel; B has priority 0
    out = _grub(tmp_path, disk)
    flat = out.replace("\n", "")
    assert "EMU-BOOT" not in out
    assert f"{grub.MARK_LOAD_FAIL} A (A:linux:1.0.0)" in flat and "and no other slot is bootable" in flat
    assert _env(disk)[grub.LOADFAIL_VAR] == "A:linux:1.0.0"
    _set(disk, "B", 2, 0, 1)
    out = _grub(tmp_path, disk)
    flat = out.replace("\n", "")
    assert "EMU-BOOT" not in out and "falling back to slot A" in flat
    assert f"{grub.MARK_LOAD_FAIL} A (A:linux:1.0.0)" in flat and "either" in flat
