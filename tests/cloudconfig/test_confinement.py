"""Hostile paths: nothing apply reads or writes may lie outside `--root` (issue 19: `..` in homedir,
absolute links such as `etc/shadow -> /etc/shadow`), every value is checked before the first write
(uids past 2^32), and modes do not follow the umask.

A canary directory next to the root holds files shaped like the ones apply reads; each test proves
they are neither written (content, mode, owner, listing) nor read (atime, set to 0 before: with
relatime the next read moves it, which the `atime_works` probe checks on this filesystem).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from cloudconfig_helpers import make_root, tree_digest

from cloudconfig.apply import ConfigApplyError, InvalidConfig, apply_userdata
from cloudconfig.rootfs import Plan
from cloudconfig.validate import validate_bytes

MARK = "CANARY-SECRET"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx bob@example"
NAMES = ("passwd", "shadow", "group", "update.conf", "lock.conf", "hostname", "environment", "x.service", "evil",
         "authorized_keys")


def _atime_works(d: Path) -> bool:
    probe = d / ".probe"
    probe.write_text("x")
    os.utime(probe, (0, time.time()))
    probe.read_text()
    works = probe.stat().st_atime != 0
    probe.unlink()
    return works


class Canary:
    """Files outside the root; ``check()`` asserts none was read, written, chowned or added to."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        d.mkdir()
        self.atime = _atime_works(d)
        for n in NAMES:
            (d / n).write_text(f"root:{MARK}:0:0:{MARK}:/root:/bin/sh\n[Install]\nWantedBy=multi-user.target\n")
            os.chmod(d / n, 0o604)
            os.utime(d / n, (0, time.time()))  # relatime: the next read moves atime
        self.before = {n: (d / n).stat() for n in NAMES}
        self.dir_stat = d.stat()

    def check(self, root: Path) -> None:
        assert sorted(p.name for p in self.dir.iterdir()) == sorted(NAMES)
        st = self.dir.stat()
        assert (st.st_mode, st.st_uid, st.st_gid) == (self.dir_stat.st_mode, self.dir_stat.st_uid,
                                                      self.dir_stat.st_gid)
        for n in NAMES:
            now, was = (self.dir / n).stat(), self.before[n]
            if self.atime:
                assert now.st_atime == 0, f"{n} outside the root was read"
            assert (now.st_mode, now.st_uid, now.st_gid, now.st_mtime_ns) == (was.st_mode, was.st_uid, was.st_gid,
                                                                               was.st_mtime_ns)
        for dirpath, _dirs, files in os.walk(root):  # nothing read from outside ended up inside
            for f in files:
                p = Path(dirpath) / f
                if p.is_file() and not p.is_symlink():
                    assert MARK.encode() not in p.read_bytes(), f"{p} holds the canary"


@pytest.fixture
def canary(tmp_path: Path) -> Canary:
    return Canary(tmp_path / "outside")


# --- 1. `..` and paths derived from the config or the root's own files ---------------------------

HOMES = ["/home/../../outside", "/..", "/home/bob/../../../outside", "/./../outside", "/home/../..", "/home/.."]


@pytest.mark.parametrize("home", HOMES)
def test_homedir_with_dotdot_is_refused_at_validation(home: str, root: Path, canary: Canary) -> None:
    raw = (f"#cloud-config\nusers:\n  - name: bob\n    homedir: {home}\n"
           f"    ssh-authorized-keys: [{KEY}]\n").encode()
    rep = validate_bytes(raw)
    assert [(e.line, e.message) for e in rep.errors] == [
        (4, f"invalid path {home!r}: '..' is not allowed (a home must stay inside the target root)")]
    digest = tree_digest(root)
    with pytest.raises(InvalidConfig):
        apply_userdata(raw, root)
    assert tree_digest(root) == digest
    canary.check(root)


@pytest.mark.parametrize("home", ["/home/../../outside", "../outside", "", "home/bob", "/home/bob/../../.."])
def test_home_in_the_roots_passwd_that_leads_out_is_refused(home: str, root: Path, canary: Canary) -> None:
    """The root's own passwd is input too: an existing user's home is not trusted to stay inside."""
    with (root / "etc/passwd").open("a") as f:
        f.write(f"bob:x:1001:1001::{home}:/bin/sh\n")
    digest = tree_digest(root)
    with pytest.raises(ConfigApplyError, match=r"user bob: home .* is not an absolute path without '\.\.'"):
        apply_userdata(f"#cloud-config\nusers:\n  - name: bob\n    ssh-authorized-keys: [{KEY}]\n".encode(), root)
    assert tree_digest(root) == digest
    canary.check(root)


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_home_that_is_a_link_out_of_the_root_is_refused(how: str, root: Path, canary: Canary) -> None:
    with (root / "etc/passwd").open("a") as f:
        f.write("bob:x:1001:1001::/home/bob:/bin/sh\n")
    # absolute: means <root>/<that path> (as in a chroot), which is not there; relative: climbs above the root
    (root / "home/bob").symlink_to(canary.dir if how == "absolute" else "../../outside")
    digest = tree_digest(root)
    with pytest.raises(ConfigApplyError, match="/home/bob .*(not a directory inside|link out of) the target root"):
        apply_userdata(f"#cloud-config\nssh_authorized_keys: [{KEY}]\nusers:\n  - name: bob\n"
                       f"    ssh-authorized-keys: [{KEY}]\n".encode(), root)
    assert tree_digest(root) == digest
    canary.check(root)


@pytest.mark.parametrize("path", ["/etc/../../outside/evil", "/../outside/evil", "/etc/x/../../../outside/evil"])
def test_write_files_path_with_dotdot_is_refused(path: str, root: Path, canary: Canary) -> None:
    raw = f"#cloud-config\nwrite_files:\n  - content: x\n    path: {path}\n".encode()
    assert [(e.line, e.message) for e in validate_bytes(raw).errors] == [
        (4, f"invalid path {path!r}: '..' and NUL are not allowed")]
    with pytest.raises(InvalidConfig):
        apply_userdata(raw, root)
    canary.check(root)


@pytest.mark.parametrize(("doc", "line"), [
    ("coreos:\n  units:\n    - name: ../../outside/evil.service\n      content: x\n", 4),
    ("coreos:\n  units:\n    - name: a.service\n      drop-ins:\n        - name: ../../../outside/evil.conf\n", 6),
])
def test_unit_and_dropin_names_cannot_hold_a_path(doc: str, line: int, root: Path, canary: Canary) -> None:
    raw = f"#cloud-config\n{doc}".encode()
    assert [e.line for e in validate_bytes(raw).errors] == [line]
    with pytest.raises(InvalidConfig):
        apply_userdata(raw, root)
    canary.check(root)


@pytest.mark.parametrize("path", ["/etc/../../outside/evil", "etc/passwd", "/etc/\0x", "../outside/evil"])
def test_plan_refuses_paths_that_could_leave_the_root(path: str, root: Path, canary: Canary) -> None:
    """The plan is the one door to the disk: even a caller that skipped validation cannot get out."""
    plan = Plan(root)
    for call in (lambda: plan.write(path, b"x"), lambda: plan.mkdir(path), lambda: plan.symlink(path, "/x"),
                 lambda: plan.read(path), lambda: plan.exists(path), lambda: plan.remove(path)):
        with pytest.raises(ConfigApplyError):
            call()
    canary.check(root)


# --- 2. reads resolve inside the root too ---------------------------------------------------------

CONFIGS = {
    "user": f"users:\n  - name: bob\n    ssh-authorized-keys: [{KEY}]\n",
    "update": "coreos:\n  update:\n    group: beta\n",
    "lock": "coreos:\n  locksmith:\n    group: web\n",
    "enable": "coreos:\n  units:\n    - name: x.service\n      enable: true\n",
    "hosts": "manage_etc_hosts: localhost\n",
    "keys": f"ssh_authorized_keys: [{KEY}]\n",
}
# (link inside the root, its target: {out} = the canary directory, config that makes apply read it, error)
LINKS = [
    ("etc/shadow", "{out}/shadow", "user", "/etc/shadow in .* is a link to"),
    ("etc/shadow", "/etc/shadow", "user", "/etc/shadow in .* is a link loop"),  # issue 19's own example
    ("etc/passwd", "{out}/passwd", "user", "/etc/passwd in .* is a link to"),
    ("etc/passwd", "../../../../../../../../../../..{out}/passwd", "user", "/etc/passwd in .* link out of the"),
    ("etc/group", "{out}/group", "user", "/etc/group in .* is a link to"),
    ("etc/group", "group2", "user", None),  # set up below as a loop group -> group2 -> group
    ("usr/share/obelisk/update.conf", "{out}/update.conf", "update", "update.conf in .* is a link to"),
    ("usr/share/obelisk", "{out}", "update", "/usr/share/obelisk in .* is a link to"),  # a parent directory
    ("etc/obelisk/lock.conf", "{out}/lock.conf", "lock", "/etc/obelisk/lock.conf in .* is a link to"),
    ("etc/systemd/system/x.service", "{out}/x.service", "enable", "x.service in .* is a link to"),
    ("etc/hostname", "{out}/hostname", "hosts", "/etc/hostname in .* is a link to"),
    ("etc/environment", "{out}/environment", "env", "/etc/environment in .* is a link to"),
    ("home/core/.ssh/authorized_keys.d/evil", "{out}/evil", "keys", "authorized_keys.d/evil in .* is a symlink"),
]


@pytest.mark.parametrize(("link", "target", "config", "error"), LINKS, ids=lambda v: str(v)[:30])
def test_a_link_out_of_the_root_is_never_followed_for_reading(link: str, target: str, config: str,
                                                              error: str | None, root: Path,
                                                              canary: Canary) -> None:
    if config == "keys":
        apply_userdata(f"#cloud-config\nssh_authorized_keys: [{KEY}]\n".encode(), root)  # core and its .ssh
    if link == "usr/share/obelisk":
        for f in (root / link).iterdir():
            f.unlink()
        (root / link).rmdir()
    host = root / link
    host.parent.mkdir(parents=True, exist_ok=True)
    if host.exists() or host.is_symlink():
        host.unlink()
    if error is None:  # two links pointing at each other
        (root / "etc/group2").symlink_to("/etc/group")
        error = "is a link loop"
    host.symlink_to(target.format(out=canary.dir))
    digest = tree_digest(root)
    addresses = {"private_ipv4": "10.0.0.5"} if config == "env" else None
    raw = f"#cloud-config\n{CONFIGS.get(config, 'hostname: h')}\n".encode()
    with pytest.raises(ConfigApplyError, match=error):
        apply_userdata(raw, root, addresses=addresses)
    assert tree_digest(root) == digest
    canary.check(root)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "chardev", "socket"])
def test_a_special_file_where_apply_reads_is_an_error_not_a_hang(kind: str, root: Path, canary: Canary) -> None:
    """A FIFO would block the read forever, /dev/zero would never end: both are refused by name."""
    shadow = root / "etc/shadow"
    shadow.unlink()
    if kind == "fifo":
        os.mkfifo(shadow)
    elif kind == "chardev":
        os.mknod(shadow, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(shadow))
        s.close()
    digest = tree_digest(root)
    with pytest.raises(ConfigApplyError, match=r"/etc/shadow in .* is a (FIFO|character device|socket), not a regular"):
        apply_userdata(f"#cloud-config\n{CONFIGS['user']}".encode(), root)
    assert tree_digest(root) == digest
    canary.check(root)


def test_links_inside_the_root_resolve_inside_it(root: Path, canary: Canary) -> None:
    """An image's absolute links mean the image's files (a chroot's view), never this machine's."""
    sysd = root / "etc/systemd/system"
    sysd.mkdir(parents=True)
    (sysd / "y.service").symlink_to("/usr/lib/systemd/system/sshd.service")  # absolute, in the image
    (root / "etc/passwd").rename(root / "etc/passwd.real")
    (root / "etc/passwd").symlink_to("passwd.real")  # relative
    (root / "var").mkdir()
    (root / "var/run").symlink_to("/run")  # Debian's /var/run -> /run, which the root does not have yet
    (root / "run").mkdir()
    apply_userdata(b"#cloud-config\nusers:\n  - name: bob\ncoreos:\n  units:\n    - name: y.service\n"
                   b"      enable: true\nwrite_files:\n  - path: /var/run/x\n    content: x\n", root)
    wants = sysd / "multi-user.target.wants/y.service"  # WantedBy= read from the root's sshd.service
    assert os.readlink(wants) == "/etc/systemd/system/y.service"
    assert "root:x:0:0" in (root / "etc/passwd").read_text()  # read through the link, then written as a file
    assert (root / "run/x").read_text() == "x" and (root / "var/run").is_symlink()
    canary.check(root)


# --- 5. every value is checked before the first write ---------------------------------------------

@pytest.mark.parametrize(("owner", "message"), [
    ("4294967296", "a uid or gid is at most 4294967294"),  # issue 19: OverflowError after two files
    ("4294967295", "a uid or gid is at most 4294967294"),  # (uid_t)-1: chown's "leave unchanged"
    ("0:99999999999999999999", "a uid or gid is at most 4294967294"),
    ("root:4294967296", "a uid or gid is at most 4294967294"),
])
def test_out_of_range_owner_is_refused_at_validation(owner: str, message: str, root: Path) -> None:
    raw = (f"#cloud-config\nwrite_files:\n  - path: /etc/a\n    content: a\n  - path: /etc/b\n    content: b\n"
           f"  - path: /etc/c\n    content: c\n    owner: \"{owner}\"\n").encode()
    assert [(e.line, e.message) for e in validate_bytes(raw).errors] == [
        (9, f"invalid owner {owner!r}: {message}")]
    digest = tree_digest(root)
    with pytest.raises(InvalidConfig):
        apply_userdata(raw, root)
    assert tree_digest(root) == digest


@pytest.mark.parametrize(("row", "owner", "error"), [
    ("bob:x:99999999999:1000::/home/bob:/bin/sh", "bob", "user bob in .* id '99999999999' is not a number"),
    ("bob:x:4294967295:1000::/home/bob:/bin/sh", "bob", "id '4294967295' is not a number from 0 to 4294967294"),
    ("bob:x:-1:1000::/home/bob:/bin/sh", "bob", "id '-1' is not a number"),
    ("bob:x:x:1000::/home/bob:/bin/sh", "bob", "id 'x' is not a number"),
    ("bob:x:1001:1e9::/home/bob:/bin/sh", "bob", "id '1e9' is not a number"),
])
def test_bad_ids_in_the_roots_files_stop_apply_before_the_first_write(row: str, owner: str, error: str,
                                                                      root: Path) -> None:
    """Two good files come first in the config: a half-applied root would have them."""
    with (root / "etc/passwd").open("a") as f:
        f.write(row + "\n")
    digest = tree_digest(root)
    with pytest.raises(ConfigApplyError, match=error):
        apply_userdata(f"#cloud-config\nhostname: h1\nwrite_files:\n  - path: /etc/a\n    content: a\n"
                       f"  - path: /etc/b\n    content: b\n    owner: {owner}\n".encode(), root)
    assert tree_digest(root) == digest


def test_bad_gid_in_the_roots_group_file(root: Path) -> None:
    with (root / "etc/group").open("a") as f:
        f.write("big:x:5000000000:\n")
    digest = tree_digest(root)
    with pytest.raises(ConfigApplyError, match="group big in .* id '5000000000' is not a number"):
        apply_userdata(b"#cloud-config\nwrite_files:\n  - path: /etc/a\n    content: a\n"
                       b"  - path: /etc/b\n    content: b\n    owner: root:big\n", root)
    assert tree_digest(root) == digest


@pytest.mark.parametrize("doc", [
    'coreos:\n  units:\n    - name: a.service\n      content: "[Service]\\n\\ud800"\n',
    'write_files:\n  - path: /etc/a\n    content: "\\udfff"\n',
    'users:\n  - name: bob\n    gecos: "\\ud83d"\n',
])
def test_text_no_file_can_hold_is_refused_at_validation(doc: str, root: Path) -> None:
    """A lone surrogate escape made apply raise UnicodeEncodeError while planning (a traceback)."""
    raw = f"#cloud-config\nhostname: h1\n{doc}".encode()
    errors = validate_bytes(raw).errors
    assert len(errors) == 1 and "contains a lone surrogate" in errors[0].message
    digest = tree_digest(root)
    with pytest.raises(InvalidConfig):
        apply_userdata(raw, root)
    assert tree_digest(root) == digest


@pytest.mark.parametrize(("call", "error"), [
    (lambda p: p.write("/etc/a", b"x", 0o10000), "mode 4096 is not a file mode"),
    (lambda p: p.write("/etc/a", b"x", -1), "mode -1 is not a file mode"),
    (lambda p: p.write("/etc/a", b"x", 0o644, 2**32), "uid 4294967296 is out of range"),
    (lambda p: p.mkdir("/etc/d", 0o755, 0, -5), "gid -5 is out of range"),
    (lambda p: p.symlink("/etc/l", "a\0b"), "bad link target"),
])
def test_plan_checks_values_when_planned(call, error: str, root: Path) -> None:
    plan = Plan(root)
    plan.write("/etc/first", b"planned before the bad one")
    with pytest.raises(ConfigApplyError, match=error):
        call(plan)
    assert not (root / "etc/first").exists()


def test_os_failure_during_commit_is_one_clean_error(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk cannot be made on demand here, so the file write is made to fail as it would (ENOSPC)."""
    import errno

    import cloudconfig.rootfs as rootfs

    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rootfs, "_atomic_write", full)
    with pytest.raises(ConfigApplyError, match=r"cannot write /etc/hostname in .*: No space left on device; "
                                               "nothing was changed; fix it and run apply again"):
        apply_userdata(b"#cloud-config\nhostname: h1\n", root)


# --- 8. modes are exact, whatever the umask --------------------------------------------------------

UMASK_CONFIG = f"""#cloud-config
hostname: m1
ssh_authorized_keys: [{KEY}]
users:
  - name: alice
write_files:
  - path: /etc/motd
    permissions: "0640"
    content: hi
  - path: /var/lib/deep/new/dir/file
    permissions: "4755"
    content: x
  - path: /etc/ssl/etcd/key.pem
    content: KEY
coreos:
  etcd2:
    name: m1
    key-file: /etc/ssl/etcd/key.pem
  units:
    - name: a.service
      content: "[Install]\\nWantedBy=multi-user.target\\n"
      enable: true
      drop-ins:
        - name: 10-x.conf
          content: "[Service]\\n"
    - name: 10-eth.network
      runtime: true
      content: "[Match]\\n"
""".encode()


def _modes(root: Path) -> dict[str, int]:
    return {str(Path(d, n).relative_to(root)): stat.S_IMODE(os.lstat(Path(d, n)).st_mode)
            for d, dirs, files in os.walk(root) for n in [*dirs, *files]}


@pytest.mark.parametrize("umask", [0o000, 0o777, 0o002])
def test_modes_do_not_follow_the_umask(umask: int, tmp_path: Path) -> None:
    reference = make_root(tmp_path / "reference")
    apply_userdata(UMASK_CONFIG, reference)
    root = make_root(tmp_path / "root")
    old = os.umask(umask)
    try:
        apply_userdata(UMASK_CONFIG, root)
    finally:
        os.umask(old)
    modes = _modes(root)
    assert modes == _modes(reference)
    expected = {"etc/motd": 0o640, "var/lib/deep/new/dir/file": 0o4755, "var": 0o755, "var/lib/deep/new/dir": 0o755,
                "etc/ssl/etcd/key.pem": 0o600, "etc/hostname": 0o644, "home/alice": 0o700, "home/core/.ssh": 0o700,
                "home/core/.ssh/authorized_keys": 0o600, "home/core/.ssh/authorized_keys.d": 0o700,
                "etc/obelisk": 0o755, "etc/obelisk/etcd.env": 0o644, "etc/systemd/system/a.service.d": 0o755,
                "etc/systemd/system/a.service.d/10-x.conf": 0o644, "run/systemd/network": 0o755,
                "run/systemd/network/10-eth.network": 0o644, "etc/shadow": 0o640, "etc/passwd": 0o644}
    assert {k: modes[k] for k in expected} == expected
