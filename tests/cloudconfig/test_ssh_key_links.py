"""SSH keys are written by root into a tree the user controls: a link there must never make apply copy
/etc/shadow into a file the user owns, or write keys where the link points.

Each case plants a user-made link (or hard link) below a home, puts a canary line in the root's
/etc/shadow, re-applies through `obelisk cloudconfig apply --root` (and the Ignition engine), and
checks: refused with one line naming the link, the tree unchanged, no canary in any user-owned file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cloudconfig_helpers import make_root, tree_digest
from typer.testing import CliRunner

from cloudconfig import ignition
from cloudconfig.cli import app
from cloudconfig.rootfs import ConfigApplyError

pytestmark = pytest.mark.timeout(60)
runner = CliRunner()
CANARY = "CANARY-shadow-line"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK alice@example"


def _root(tmp_path: Path) -> Path:
    """A root where alice exists with a home she owns (uid 1000) and keys applied once already."""
    root = make_root(tmp_path / "root")
    with (root / "etc/shadow").open("a") as f:
        f.write(f"secret:{CANARY}:19000:0:99999:7:::\n")
    cfg = _config(tmp_path)
    res = runner.invoke(app, ["apply", str(cfg), "--root", str(root)])
    assert res.exit_code == 0, res.output
    assert (root / "home/alice/.ssh/authorized_keys").read_text() == KEY + "\n"
    return root


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "user-data"
    cfg.write_text(f"#cloud-config\nusers:\n  - name: alice\n    ssh_authorized_keys: ['{KEY}']\n")
    return cfg


def _ssh(root: Path) -> Path:
    return root / "home/alice/.ssh"


def _link_keys_absolute(root: Path) -> str:
    (_ssh(root) / "authorized_keys").unlink()
    (_ssh(root) / "authorized_keys").symlink_to("/etc/shadow")
    return r"/home/alice/\.ssh/authorized_keys in .* is a symlink \(to /etc/shadow\)"


def _link_keys_relative(root: Path) -> str:
    (_ssh(root) / "authorized_keys").unlink()
    (_ssh(root) / "authorized_keys").symlink_to("../../../etc/shadow")
    return r"/home/alice/\.ssh/authorized_keys in .* is a symlink \(to \.\./\.\./\.\./etc/shadow\)"


def _link_keys_without_dir(root: Path) -> str:
    """The first apply path: no authorized_keys.d yet, so authorized_keys would be kept as old_authorized_keys."""
    for f in (_ssh(root) / "authorized_keys.d").iterdir():
        f.unlink()
    (_ssh(root) / "authorized_keys.d").rmdir()
    (_ssh(root) / "authorized_keys").unlink()
    (_ssh(root) / "authorized_keys").symlink_to("/etc/shadow")
    return r"/home/alice/\.ssh/authorized_keys in .* is a symlink \(to /etc/shadow\)"


def _link_ssh_dir(root: Path) -> str:
    ssh = _ssh(root)
    for f in (ssh / "authorized_keys.d").iterdir():
        f.unlink()
    (ssh / "authorized_keys.d").rmdir()
    (ssh / "authorized_keys").unlink()
    ssh.rmdir()
    ssh.symlink_to("/etc")
    return r"/home/alice/\.ssh in .* is a symlink \(to /etc\)"


def _link_fragments_dir(root: Path) -> str:
    d = _ssh(root) / "authorized_keys.d"
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    d.symlink_to("/etc")
    return r"/home/alice/\.ssh/authorized_keys\.d in .* is a symlink \(to /etc\)"


def _link_fragment(root: Path) -> str:
    (_ssh(root) / "authorized_keys.d/stolen").symlink_to("/etc/shadow")
    return r"/home/alice/\.ssh/authorized_keys\.d/stolen in .* is a symlink \(to /etc/shadow\)"


def _hardlink_keys(root: Path) -> str:
    """Only where fs.protected_hardlinks is 0 can a user do this; root (the test) can always."""
    (_ssh(root) / "authorized_keys").unlink()
    os.link(root / "etc/shadow", _ssh(root) / "authorized_keys")
    return r"/home/alice/\.ssh/authorized_keys in .* has 2 hard links"


def _hardlink_fragment(root: Path) -> str:
    os.link(root / "etc/shadow", _ssh(root) / "authorized_keys.d/stolen")
    return r"/home/alice/\.ssh/authorized_keys\.d/stolen in .* has 2 hard links"


def _fifo_keys(root: Path) -> str:
    (_ssh(root) / "authorized_keys").unlink()
    os.mkfifo(_ssh(root) / "authorized_keys")
    return r"/home/alice/\.ssh/authorized_keys in .* is not a regular file"


PLANTS: list[Callable[[Path], str]] = [_link_keys_absolute, _link_keys_relative, _link_keys_without_dir, _link_ssh_dir,
                                       _link_fragments_dir, _link_fragment, _hardlink_keys, _hardlink_fragment,
                                       _fifo_keys]


def _user_files_hold_the_canary(root: Path) -> list[str]:
    """Regular files under /home (not following links) that contain the canary."""
    found = []
    for dirpath, _dirs, files in os.walk(root / "home"):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink() and os.stat(p).st_nlink == 1 and CANARY in p.read_text("latin-1"):
                found.append(str(p))
    return found


@pytest.mark.parametrize("plant", PLANTS, ids=lambda f: f.__name__.lstrip("_"))
def test_cloudconfig_reapply_refuses_links_below_the_home(plant: Callable[[Path], str], tmp_path: Path) -> None:
    root = _root(tmp_path)
    error = plant(root)
    digest = tree_digest(root)
    res = runner.invoke(app, ["apply", str(_config(tmp_path)), "--root", str(root)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ssh keys of alice: "), res.stderr
    assert re.search(error, lines[0]), lines[0]
    assert lines[0].endswith("nothing was changed)")
    assert tree_digest(root) == digest
    assert _user_files_hold_the_canary(root) == []


@pytest.mark.parametrize("plant", [_link_keys_absolute, _link_keys_without_dir, _link_fragment, _hardlink_keys,
                                   _hardlink_fragment], ids=lambda f: f.__name__.lstrip("_"))
def test_ignition_refuses_the_same_links(plant: Callable[[Path], str], tmp_path: Path) -> None:
    root = _root(tmp_path)
    error = plant(root)
    digest = tree_digest(root)
    cfg = json.dumps({"ignition": {"version": "3.4.0"}, "passwd": {"users": [{"name": "alice",
                                                                             "sshAuthorizedKeys": [KEY]}]}})
    with pytest.raises(ConfigApplyError, match=error):
        ignition.apply(cfg.encode(), root)
    assert tree_digest(root) == digest
    assert _user_files_hold_the_canary(root) == []


def test_the_core_users_keys_from_metadata_are_guarded_too(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    (root / "etc/shadow").write_text((root / "etc/shadow").read_text() + f"secret:{CANARY}:1::::::\n")
    cfg = tmp_path / "ud"
    cfg.write_text(f"#cloud-config\nssh_authorized_keys: ['{KEY}']\n")
    assert runner.invoke(app, ["apply", str(cfg), "--root", str(root)]).exit_code == 0
    ssh = root / "home/core/.ssh"
    (ssh / "authorized_keys").unlink()
    (ssh / "authorized_keys").symlink_to("/etc/shadow")
    res = runner.invoke(app, ["apply", str(cfg), "--root", str(root)])
    assert res.exit_code == 2 and "ssh keys of core: /home/core/.ssh/authorized_keys in " in res.stderr
    assert _user_files_hold_the_canary(root) == []


def test_a_plain_tree_is_still_reapplied(tmp_path: Path) -> None:
    """The guard does not refuse the layout apply itself makes (regular files, one link each)."""
    root = _root(tmp_path)
    (_ssh(root) / "authorized_keys.d/mine").write_text("ssh-ed25519 AAAAmine alice@laptop\n")
    res = runner.invoke(app, ["apply", str(_config(tmp_path)), "--root", str(root)])
    assert res.exit_code == 0, res.output
    assert (_ssh(root) / "authorized_keys").read_text() == f"ssh-ed25519 AAAAmine alice@laptop\n{KEY}\n"
