"""Helpers for the GPT and slot tests: small sparse disks in the obelisk layout, the real CLI."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootloader import gpt, slots

OBELISK = str(Path(sys.executable).with_name("obelisk"))

MiB = 1024 * 1024
DISK_SIZE = 16 * MiB
ESP_TYPE = slots.ESP_TYPE
OEM_TYPE = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def obelisk_specs() -> list[gpt.PartitionSpec]:
    """The builder's layout, shrunk: 1 ESP, 3 USR-A (P1 T0 S1), 4 USR-B (P0 T0 S0), 6 OEM, 9 ROOT."""
    usr_a = slots.encode(0, priority=1, tries=0, successful=True)
    return [
        gpt.PartitionSpec(1, "EFI-SYSTEM", ESP_TYPE, uuid.UUID(int=0x101), 2048, 4096),
        gpt.PartitionSpec(3, "USR-A", slots.USR_TYPE, slots.USR_A_UUID, 6144, 4096, usr_a),
        gpt.PartitionSpec(4, "USR-B", slots.USR_TYPE, slots.USR_B_UUID, 10240, 4096),
        gpt.PartitionSpec(6, "OEM", OEM_TYPE, uuid.UUID(int=0x106), 14336, 2048),
        gpt.PartitionSpec(9, "ROOT", slots.ROOT_TYPE, uuid.UUID(int=0x109), 16384, 8192),
    ]


def make_disk(path: Path) -> Path:
    gpt.create_table(path, DISK_SIZE, obelisk_specs(), uuid.UUID(int=1))
    return path


def make_esp_disk(tmp: Path) -> Path:
    """make_disk with a real FAT ESP (mkfs.fat + mcopy) holding grub.cfg and a grubenv (A 1.0.0, B 1.1.0)."""
    from bootloader import esp, grub
    from obelisk.tools import run

    d = make_disk(tmp / "disk.raw")
    espimg = tmp / "esp.img"
    with open(espimg, "wb") as f:
        f.truncate(2 * MiB)
    run(["mkfs.fat", "-n", "EFI-SYSTEM", espimg])
    files = tmp / "espfiles"
    (files / "EFI/obelisk").mkdir(parents=True)
    (files / grub.CFG_PATH).write_text(grub.render_cfg())
    env = esp.initial_env(esp.SlotBoot("ab" * 32, 4096, "1.0.0"), esp.SlotBoot("cd" * 32, 8192, "1.1.0"))
    (files / grub.ENV_PATH).write_bytes(grub.render_env(env.to_vars()))
    run(["mcopy", "-s", "-i", espimg, files / "EFI", "::/"])
    with open(d, "r+b") as f:
        f.seek(esp.esp_offset(d))
        f.write(espimg.read_bytes())
    espimg.unlink()
    return d


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Run:
    code: int
    out: str
    err: str


def obelisk(*args: str | Path) -> Run:
    """`obelisk boot ...` in a real process: the same typer app the root CLI mounts, started as
    `python -m bootloader.cli` so a half-finished sibling command cannot break these tests
    (test_root_cli_mounts_boot checks the mounted `obelisk boot` itself)."""
    assert args[0] == "boot"
    argv = [sys.executable, "-m", "bootloader.cli", *map(str, args[1:])]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    return Run(p.returncode, p.stdout, p.stderr)


def obelisk_inproc(*args: str | Path) -> Run:
    """The same app through typer's CliRunner, for long lists of cases (a process start costs ~0.5 s)."""
    from typer.testing import CliRunner

    from bootloader.cli import app

    assert args[0] == "boot"
    r = CliRunner().invoke(app, [str(a) for a in args[1:]])
    return Run(r.exit_code, r.stdout, r.stderr)


def state(path: Path) -> dict[int, tuple[int, int, bool]]:
    return {s.index: (s.priority, s.tries, s.successful) for s in slots.read_slots(path)}


def need_gpt_tools() -> None:
    """Fail (not skip): `make setup` installs cgpt and gdisk."""
    missing = [t for t in ("cgpt", "sgdisk") if not shutil.which(t, path="/usr/bin:/usr/sbin:/bin:/sbin")]
    if missing:
        pytest.fail(f"missing tools {missing}: run 'make setup'")
