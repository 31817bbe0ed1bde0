"""bootloader.initramfs.build: deterministic cpio, modules in dependency order, clear errors.

The kernel tree here is made up (empty .ko files with a modules.dep), because the real Debian
kernel is only in the builder's cache; the VM scenarios boot the real one. busybox, veritysetup,
sgdisk and resize2fs with their libraries come from the host, as they do in a build.
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest
from testlib import need_tools

from bootloader import initramfs

KVER = "6.1.0-test-amd64"


def fake_tree(root: Path, *, drop: str | None = None) -> Path:
    moddir = root / "usr/lib/modules" / KVER
    deps: dict[str, list[str]] = {}
    for name in initramfs.MODULES + ["virtio", "virtio_ring", "jbd2", "mbcache", "fat", "dm_bufio_dep"]:
        if name == drop:
            continue
        rel = f"kernel/x/{name.replace('_', '-') if name == 'dm_mod' else name}.ko"
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(f"module {name}".encode())
        deps[name] = []
    deps["virtio_blk"] = ["virtio", "virtio_ring"]
    deps["ext4"] = ["jbd2", "mbcache"]
    deps["vfat"] = ["fat"]
    lines = []
    for name, ds in deps.items():
        rel = f"kernel/x/{name.replace('_', '-') if name == 'dm_mod' else name}.ko"
        lines.append(f"{rel}: " + " ".join(f"kernel/x/{d}.ko" for d in ds if d in deps))
    (moddir / "modules.dep").write_text("\n".join(lines) + "\n")
    (moddir / "modules.builtin").write_text("kernel/crypto/crc32c_intel.ko\n")
    return root


def cpio_names(img: Path) -> list[str]:
    out = subprocess.run(["cpio", "-t", "--quiet"], input=gzip.decompress(img.read_bytes()), capture_output=True)
    return out.stdout.decode().split()


def test_deterministic_and_complete(tmp_path: Path) -> None:
    need_tools("busybox", "veritysetup", "sgdisk", "resize2fs", "cpio")
    tree = fake_tree(tmp_path / "tree")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    initramfs.build(tree, a)
    initramfs.build(tree, b)
    assert a.read_bytes() == b.read_bytes()
    names = cpio_names(a)
    for must in ("init", "usr/bin/busybox", "usr/sbin/veritysetup", "usr/sbin/sgdisk", "etc/obelisk/modules",
                 "usr/lib/obelisk/initramfs-functions", "usr/lib64/ld-linux-x86-64.so.2"):
        assert must in names, must
    assert names == sorted(names)  # sorted entries: part of what makes it reproducible
    order = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "etc/obelisk/modules"],
                           input=gzip.decompress(a.read_bytes()), capture_output=True).stdout.decode().split()
    base = [Path(p).stem for p in order]
    assert base.index("virtio") < base.index("virtio_blk") and base.index("jbd2") < base.index("ext4")
    assert "crc32c_intel" not in base  # built in: nothing to load


def test_missing_module_and_kernel_errors(tmp_path: Path) -> None:
    with pytest.raises(initramfs.InitramfsError, match="dm_verity not found"):
        initramfs.build(fake_tree(tmp_path / "t1", drop="dm_verity"), tmp_path / "x.img")
    with pytest.raises(initramfs.InitramfsError, match="no kernel modules"):
        initramfs.build(tmp_path / "empty", tmp_path / "x.img")
    two = fake_tree(tmp_path / "t2")
    (two / "usr/lib/modules/6.2.0-other/kernel").mkdir(parents=True)
    with pytest.raises(initramfs.InitramfsError, match="2 kernels"):
        initramfs.build(two, tmp_path / "x.img")
    assert not (tmp_path / "x.img").exists()


def test_init_script_is_valid_sh() -> None:
    for f in (initramfs.DATA / "init", initramfs.DATA / "functions.sh"):
        subprocess.run(["busybox", "sh", "-n", str(f)], check=True)
