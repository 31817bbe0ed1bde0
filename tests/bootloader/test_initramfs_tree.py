"""bootloader/initramfs.py reads the image tree the way a chroot would: a link never reaches the build host."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootloader.initramfs import InitramfsError, _read, in_tree

pytestmark = pytest.mark.timeout(30)


def test_absolute_and_climbing_links_stay_inside_the_tree(tmp_path: Path) -> None:
    canary = tmp_path / "host-secret"
    canary.write_text("build host's secret")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/shadow").write_text("tree's own shadow")
    (tree / "usr/sbin").mkdir(parents=True)
    (tree / "usr/sbin/veritysetup").symlink_to("/etc/shadow")            # absolute: the tree's /etc
    (tree / "usr/sbin/cryptsetup").symlink_to("../../../../host-secret")  # climbs: stops at the tree's root
    (tree / "usr/sbin/abs-canary").symlink_to(canary)                     # the host path, as seen in the tree
    assert _read(tree / "usr/sbin/veritysetup", tree) == b"tree's own shadow"
    assert in_tree(tree, tree / "usr/sbin/cryptsetup") == tree / "host-secret"
    assert not in_tree(tree, tree / "usr/sbin/abs-canary").exists()
    with pytest.raises(FileNotFoundError):
        _read(tree / "usr/sbin/cryptsetup", tree)


def test_links_through_directories_and_loops(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (tree / "usr/lib/x86_64-linux-gnu/libc.so.6").write_bytes(b"libc")
    (tree / "lib").symlink_to("usr/lib")
    (tree / "lib64").symlink_to("/lib")
    assert _read(tree / "lib64/x86_64-linux-gnu/libc.so.6", tree) == b"libc"
    (tree / "a").symlink_to("b")
    (tree / "b").symlink_to("/a")
    with pytest.raises(InitramfsError, match="too many levels of symbolic links"):
        in_tree(tree, tree / "a/x")
