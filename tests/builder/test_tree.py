"""Tree helpers on small directories: overlays, unit enabling, /usr/share/factory/etc."""

from __future__ import annotations

from pathlib import Path

from builder.stages import tree as tree_stage


def test_overlay_replaces_links_instead_of_writing_through(tmp_path: Path) -> None:
    tree, overlay = tmp_path / "tree", tmp_path / "overlay"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/os-release").write_text("ID=debian\n")
    (tree / "etc").mkdir()
    (tree / "etc/os-release").symlink_to("../usr/lib/os-release")
    (tree / "lib").symlink_to("usr/lib")
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/os-release").write_text("ID=mine\n")
    (overlay / "lib/extra").mkdir(parents=True)
    (overlay / "lib/extra/f").write_text("x")
    tree_stage.copy_overlay(overlay, tree)
    assert (tree / "usr/lib/os-release").read_text() == "ID=debian\n"  # not written through the link
    assert not (tree / "etc/os-release").is_symlink()
    assert (tree / "usr/lib/extra/f").read_text() == "x" and (tree / "lib").is_symlink()


def test_units_with_wantedby_are_enabled_in_usr(tmp_path: Path) -> None:
    tree, overlay = tmp_path / "tree", tmp_path / "overlay"
    (tree / "usr/lib/systemd").mkdir(parents=True)
    (tree / "usr/lib/systemd/systemd").write_text("")
    units = overlay / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (units / "a.service").write_text("[Unit]\nDescription=a\n[Install]\nWantedBy=multi-user.target\n")
    (units / "b.service").write_text("[Service]\nExecStart=/bin/true\n")
    tree_stage.enable_units(overlay, tree)
    link = tree / "usr/lib/systemd/system/multi-user.target.wants/a.service"
    assert link.is_symlink() and str(link.readlink()) == "../a.service"
    assert not (tree / "usr/lib/systemd/system/multi-user.target.wants/b.service").exists()


def test_factory_etc_and_tmpfiles(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc/ssh").mkdir(parents=True)
    (tree / "etc/ssh/sshd_config").write_text("x")
    (tree / "etc/hostname").write_text("h")
    tree_stage.factory_etc(tree)
    assert (tree / "usr/share/factory/etc/ssh/sshd_config").read_text() == "x"
    conf = (tree / "usr/lib/tmpfiles.d/obelisk-factory-etc.conf").read_text()
    assert "C /etc/ssh - - - - -" in conf and "/etc/hostname" not in conf


def test_pip_record_keeps_only_installed_files(tmp_path: Path) -> None:
    """pip's RECORD names direct_url.json, whose hash depends on the temporary source path: it must go."""
    from builder.stages.python import prune_records

    info = tmp_path / "obelisk-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Name: obelisk\n")
    (info / "RECORD").write_text("obelisk-0.1.0.dist-info/METADATA,sha256=abc,14\n"
                                 "obelisk-0.1.0.dist-info/direct_url.json,sha256=xyz,117\n"
                                 "obelisk-0.1.0.dist-info/RECORD,,\n")
    prune_records(tmp_path)
    assert (info / "RECORD").read_text() == ("obelisk-0.1.0.dist-info/METADATA,sha256=abc,14\n"
                                             "obelisk-0.1.0.dist-info/RECORD,,\n")


def test_ext4_write_time_is_pinned(tmp_path: Path) -> None:
    """debugfs -w stamps s_wtime with the clock; pin_write_time makes two images identical and fsck-clean."""
    import subprocess
    import time

    from builder.ext4 import pin_write_time

    imgs = []
    for i in range(2):
        img = tmp_path / f"{i}.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-U", "0b5e1c0d-0b5e-4c0d-8b5e-1c0d0b5e1c0d", "-E",
                        "hash_seed=0b5e1c0d-0b5e-4c0d-8b5e-1c0d0b5e1c0d", str(img), "8M"], check=True,
                       env={"E2FSPROGS_FAKE_TIME": "1764115200", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        # as pin_inode_times can: a debugfs -w that dirties the superblock stamps s_wtime with the real clock
        subprocess.run(["debugfs", "-w", "-R", "ssv mnt_count 0", str(img)], check=True, capture_output=True)
        pin_write_time(img, 1764115200)
        imgs.append(img.read_bytes())
        time.sleep(1.1)
    assert imgs[0] == imgs[1]
    fsck = subprocess.run(["e2fsck", "-fn", str(tmp_path / "0.img")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_overlay_never_writes_through_a_symlinked_folder_of_the_tree(tmp_path: Path) -> None:
    """A source tree may hold `etc/ssh -> <host folder>`: the overlay must refuse, not write on the build host."""
    import pytest

    from builder.errors import BuildError

    host = tmp_path / "host"
    host.mkdir()
    (host / "sshd_config").write_text("host's own\n")
    tree, overlay = tmp_path / "tree", tmp_path / "overlay"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/ssh").symlink_to(host)
    (overlay / "etc/ssh").mkdir(parents=True)
    (overlay / "etc/ssh/sshd_config").write_text("overlay\n")
    with pytest.raises(BuildError, match="the OS tree's /etc/ssh is a symlink"):
        tree_stage.copy_overlay(overlay, tree)
    assert (host / "sshd_config").read_text() == "host's own\n"
    # Units: a symlinked .wants folder is refused the same way.
    (tree / "usr/lib/systemd/system").mkdir(parents=True)
    (tree / "usr/lib/systemd/systemd").write_text("")
    (tree / "usr/lib/systemd/system/multi-user.target.wants").symlink_to(host)
    units = overlay / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (units / "a.service").write_text("[Install]\nWantedBy=multi-user.target\n")
    with pytest.raises(BuildError, match="multi-user.target.wants is a symlink"):
        tree_stage.enable_units(overlay, tree)
    assert sorted(p.name for p in host.iterdir()) == ["sshd_config"]


def test_kernel_files_behind_symlinks_are_not_taken(tmp_path: Path) -> None:
    """A vmlinuz that is a symlink (to a host file such as a signing key) is never copied into the release."""
    import pytest

    from builder import fsutil, kernel
    from builder.errors import BuildError

    secret = tmp_path / "secret.key"
    secret.write_text("private\n")
    tree = tmp_path / "tree"
    (tree / "usr/lib/modules/6.1.0").mkdir(parents=True)
    (tree / "usr/lib/modules/6.1.0/vmlinuz").symlink_to(secret)
    (tree / "boot").mkdir()
    (tree / "boot/vmlinuz-6.1.0").symlink_to(secret)
    assert kernel.find_kernel(tree) is None
    (tree / "usr/lib/modules/6.1.0/vmlinuz").unlink()
    (tree / "usr/lib/modules/6.1.0/vmlinuz").write_bytes(b"kernel")
    assert kernel.find_kernel(tree) == ("6.1.0", tree / "usr/lib/modules/6.1.0/vmlinuz")
    # kernel.exclude through a symlinked folder of the tree: refused, the host folder stays.
    (tree / "usr/lib/modules/6.1.0/kernel").symlink_to(tmp_path)
    with pytest.raises(BuildError, match="/usr/lib/modules/6.1.0/kernel is a symlink"):
        fsutil.path_inside(tree, "usr/lib/modules/6.1.0/kernel/sound")
    assert secret.is_file()


def test_os_release_quotes_pretty_name_so_a_shell_reads_it_back(tmp_path: Path) -> None:
    """os-release(5) values are shell-compatible: sourcing the file must give back the exact name."""
    import subprocess
    from types import SimpleNamespace

    from builder.definition import DEFAULT_APP_ID, TinySource

    pretty = 'My "best" OS $HOME `id` \\ 50% ünïcode'
    defn = SimpleNamespace(pretty_name=pretty, name="tiny", source=TinySource(kind="tiny"), app_id=DEFAULT_APP_ID,
                           arch="amd64")
    ctx = SimpleNamespace(definition=defn, version="1.0.0", build_id="20240101.abcd")
    tree = tmp_path / "tree"
    tree.mkdir()
    tree_stage.write_identity(ctx, tree)
    text = (tree / "usr/lib/os-release").read_text()
    assert len(text.splitlines()) == 9  # one line per key: nothing injected
    got = subprocess.run(["sh", "-c", '. "$1" && printf %s "$PRETTY_NAME"', "sh", tree / "usr/lib/os-release"],
                         capture_output=True, text=True, check=True).stdout
    assert got == pretty
