"""Ignition applied into temporary roots, checked file by file: mode, owner, contents, links, unit
enablement, passwd/group/shadow lines; Ignition's overwrite rules; paths confined to the root;
all-or-nothing; first boot only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_ignition_support import data_url, fresh_root, ign, tree

from cloudconfig import ignition
from cloudconfig.ignition import MARKER, InvalidIgnition
from cloudconfig.ignition.apply import PRESET
from cloudconfig.rootfs import ConfigApplyError

pytestmark = pytest.mark.timeout(60)

HELLO_UNIT = "[Unit]\nDescription=hello\n[Service]\nExecStart=/opt/bin/hello\n[Install]\nWantedBy=multi-user.target\n"


def _stat(p: Path) -> tuple[int, int, int]:
    st = p.lstat()
    return st.st_mode & 0o7777, st.st_uid, st.st_gid


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines()


def _no_day(lines: list[str]) -> list[str]:
    """shadow lines without the last-change day (today)."""
    return [":".join(f[:2] + f[3:]) for f in (ln.split(":") for ln in lines)]


FULL = {
    "passwd": {
        "groups": [{"name": "ops", "gid": 2000}, {"name": "builders", "system": True, "passwordHash": "$6$g$h"}],
        "users": [
            {"name": "core", "passwordHash": "$6$salt$hash", "sshAuthorizedKeys": ["ssh-ed25519 AAAAC3 core@a",
                                                                                    "ssh-rsa AAAAB3 core@b"],
             "groups": ["sudo", "ops"], "gecos": "CoreOS Admin"},
            {"name": "svc", "uid": 1500, "system": True, "noCreateHome": True, "shell": "/usr/sbin/nologin",
             "homeDir": "/var/lib/svc", "primaryGroup": "ops"},
            {"name": "worker", "noUserGroup": True, "homeDir": "/var/home/worker"},
        ]},
    "storage": {
        "directories": [{"path": "/var/lib/app", "mode": 448, "user": {"name": "core"}, "group": {"id": 2000}}],
        "files": [
            {"path": "/etc/motd", "mode": 420, "contents": {"source": data_url("hello world\n")}},
            {"path": "/opt/bin/hello", "mode": 493, "user": {"id": 1000}, "group": {"name": "ops"},
             "contents": {"source": data_url(b"#!/bin/sh\n", b64=True)},
             "append": [{"source": data_url("echo hello\n")}]},
            {"path": "/etc/hostname", "overwrite": True, "contents": {"source": data_url("node-1\n")}},
            {"path": "/var/lib/app/empty"},
        ],
        "links": [{"path": "/etc/localtime", "target": "../usr/share/zoneinfo/UTC"},
                  {"path": "/opt/bin/hi", "target": "/opt/bin/hello", "hard": True}],
    },
    "systemd": {"units": [
        {"name": "hello.service", "enabled": True, "contents": HELLO_UNIT,
         "dropins": [{"name": "10-env.conf", "contents": "[Service]\nEnvironment=GREETING=hi\n"}]},
        {"name": "sshd.service", "enabled": True},
        {"name": "etcd.service", "mask": True},
        {"name": "sshd.service.d-only.service", "dropins": [{"name": "x.conf", "contents": "[Unit]\n"}]},
    ]},
}


def test_full_config_file_by_file(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    res = ignition.apply(ign("3.4.0", **FULL), root)
    assert res.kind == "ignition" and res.changed and not res.warnings
    assert _lines(root / "etc/passwd") == [
        "root:x:0:0:root:/root:/bin/bash", "etcd:x:998:998:etcd:/var/lib/etcd:/usr/sbin/nologin",
        "core:x:1000:1000:CoreOS Admin:/home/core:/bin/bash", "svc:x:1500:2000::/var/lib/svc:/usr/sbin/nologin",
        "worker:x:1501:100::/var/home/worker:/bin/bash"]
    assert _lines(root / "etc/group") == [
        "root:x:0:", "shadow:x:42:", "sudo:x:27:core", "users:x:100:", "docker:x:997:", "etcd:x:998:",
        "ops:x:2000:core", "builders:$6$g$h:999:", "core:x:1000:"]
    assert _no_day(_lines(root / "etc/shadow")) == [
        "root:*:0:99999:7:::", "etcd:!::::::", "core:$6$salt$hash:0:99999:7:::", "svc:*:0:99999:7:::",
        "worker:*:0:99999:7:::"]
    assert _stat(root / "etc/shadow") == (0o640, 0, 42)
    # homes and keys
    assert _stat(root / "home/core") == (0o700, 1000, 1000)
    assert _stat(root / "var/home/worker") == (0o700, 1501, 100)
    assert not (root / "var/lib/svc").exists()  # noCreateHome
    keys = root / "home/core/.ssh/authorized_keys.d/ignition"
    assert keys.read_text() == "ssh-ed25519 AAAAC3 core@a\nssh-rsa AAAAB3 core@b\n"
    assert _stat(keys) == (0o600, 1000, 1000) and _stat(keys.parent) == (0o700, 1000, 1000)
    assert (root / "home/core/.ssh/authorized_keys").read_text() == keys.read_text()
    # storage
    assert (root / "etc/motd").read_text() == "hello world\n" and _stat(root / "etc/motd") == (0o644, 0, 0)
    assert (root / "opt/bin/hello").read_text() == "#!/bin/sh\necho hello\n"
    assert _stat(root / "opt/bin/hello") == (0o755, 1000, 2000)
    assert _stat(root / "opt/bin") == (0o755, 0, 0)  # a missing parent: 0755 root
    assert (root / "etc/hostname").read_text() == "node-1\n"
    assert _stat(root / "var/lib/app") == (0o700, 1000, 2000)
    assert (root / "var/lib/app/empty").read_bytes() == b"" and _stat(root / "var/lib/app/empty") == (0o644, 0, 0)
    assert os.readlink(root / "etc/localtime") == "../usr/share/zoneinfo/UTC"
    assert os.path.samefile(root / "opt/bin/hi", root / "opt/bin/hello")
    # units
    sd = root / "etc/systemd/system"
    assert (sd / "hello.service").read_text() == HELLO_UNIT and _stat(sd / "hello.service") == (0o644, 0, 0)
    assert (sd / "hello.service.d/10-env.conf").read_text() == "[Service]\nEnvironment=GREETING=hi\n"
    assert os.readlink(sd / "multi-user.target.wants/hello.service") == "/etc/systemd/system/hello.service"
    assert os.readlink(sd / "multi-user.target.wants/sshd.service") == "/usr/lib/systemd/system/sshd.service"
    assert os.readlink(sd / "etcd.service") == "/dev/null"
    assert (sd / "sshd.service.d-only.service.d/x.conf").exists() and not (sd / "sshd.service.d-only.service").exists()
    assert (root / PRESET.lstrip("/")).read_text() == "enable hello.service\nenable sshd.service\n"
    marker = json.loads((root / MARKER.lstrip("/")).read_text())
    assert marker["userConfigProvided"] is True and marker["provisionedBy"] == "obelisk"
    assert marker["spec"] == "3.4.0" and _stat(root / MARKER.lstrip("/")) == (0o600, 0, 0)


def test_gshadow_is_kept_in_step(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    (root / "etc/gshadow").write_text("root:*::\nsudo:*::\nusers:*::\n")
    ignition.apply(ign(passwd={"groups": [{"name": "ops", "passwordHash": "$6$x"}],
                               "users": [{"name": "alice", "groups": ["sudo"]}]}), root)
    assert _lines(root / "etc/gshadow") == ["root:*::", "sudo:*::alice", "users:*::", "ops:$6$x::", "alice:!::"]
    assert "ops:x:1000:" in _lines(root / "etc/group") and "alice:x:1001:" in _lines(root / "etc/group")


def test_existing_users_are_modified_and_removed(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    (root / "etc/passwd").write_text((root / "etc/passwd").read_text() + "old:x:1200:1200::/home/old:/bin/sh\n")
    (root / "etc/group").write_text((root / "etc/group").read_text() + "old:x:1200:\n")
    (root / "etc/shadow").write_text((root / "etc/shadow").read_text() + "old:*:1::::::\n")
    res = ignition.apply(ign(passwd={
        "users": [{"name": "etcd", "shell": "/bin/bash", "groups": ["docker"], "passwordHash": ""},
                  {"name": "old", "shouldExist": False}],
        "groups": [{"name": "docker", "gid": 1999}]}), root)
    assert _lines(root / "etc/passwd") == ["root:x:0:0:root:/root:/bin/bash",
                                           "etcd:x:998:998:etcd:/var/lib/etcd:/bin/bash"]
    assert "docker:x:1999:etcd" in _lines(root / "etc/group") and "old:x:1200:" not in _lines(root / "etc/group")
    assert [ln.split(":")[:2] for ln in _lines(root / "etc/shadow")] == [["root", "*"], ["etcd", "*"]]
    assert "user old removed; its home /home/old is left in place" in res.notes


@pytest.mark.parametrize(("users", "groups", "message"), [
    ([{"name": "a", "primaryGroup": "nosuch"}], [], "primaryGroup 'nosuch' does not exist"),
    ([{"name": "a", "groups": ["nosuch"]}], [], "group 'nosuch' does not exist"),
    ([{"name": "docker"}], [], "a group named docker already exists"),
    ([{"name": "a", "uid": 998}], [], "uid 998 is already used"),
    ([], [{"name": "g", "gid": 27}], "gid 27 is already used"),
    ([], [{"name": "etcd", "shouldExist": False}], "it is the primary group of etcd"),
])
def test_account_errors_change_nothing(tmp_path: Path, users: list, groups: list, message: str) -> None:
    root = fresh_root(tmp_path)
    before = tree(root, skip_marker=False)
    with pytest.raises(ConfigApplyError, match=message):
        ignition.apply(ign(passwd={"users": users, "groups": groups},
                           storage={"files": [{"path": "/etc/first", "contents": {"source": "data:,x"}}]}), root)
    assert tree(root, skip_marker=False) == before


def test_ssh_keys_keep_an_existing_authorized_keys(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    ssh = root / "root/.ssh"
    ssh.mkdir(parents=True)
    (ssh / "authorized_keys").write_text("ssh-ed25519 OLD old@key\n")
    ignition.apply(ign(passwd={"users": [{"name": "root", "sshAuthorizedKeys": ["ssh-ed25519 NEW new@key"]}]}),
                   root)
    assert (ssh / "authorized_keys").read_text() == "ssh-ed25519 NEW new@key\nssh-ed25519 OLD old@key\n"
    assert (ssh / "authorized_keys.d/old_authorized_keys").read_text() == "ssh-ed25519 OLD old@key\n"


# --- Ignition's overwrite rules -------------------------------------------------------------------

def test_an_existing_file_with_contents_needs_overwrite(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    before = tree(root, skip_marker=False)
    with pytest.raises(ConfigApplyError, match="/etc/hostname: a file exists there already and overwrite is false; "
                                               "set overwrite: true"):
        ignition.apply(ign(storage={"files": [{"path": "/etc/motd", "contents": {"source": "data:,a"}},
                                              {"path": "/etc/hostname", "contents": {"source": "data:,b"}}]}), root)
    assert tree(root, skip_marker=False) == before


def test_an_existing_file_without_contents_is_kept_appended_and_chmodded(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    (root / "etc/kept").write_text("first\n")
    os.chmod(root / "etc/kept", 0o640)
    os.chown(root / "etc/kept", 998, 998)
    (root / "etc/mode").write_text("same\n")
    ignition.apply(ign(storage={"files": [{"path": "/etc/kept", "append": [{"source": "data:,second%0A"}]},
                                          {"path": "/etc/mode", "mode": 384},
                                          {"path": "/etc/new", "append": [{"source": "data:,only"}]}]}), root)
    assert (root / "etc/kept").read_text() == "first\nsecond\n" and _stat(root / "etc/kept") == (0o640, 998, 998)
    assert (root / "etc/mode").read_text() == "same\n" and _stat(root / "etc/mode") == (0o600, 0, 0)
    assert (root / "etc/new").read_text() == "only" and _stat(root / "etc/new") == (0o644, 0, 0)


def test_overwrite_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    shadow = (root / "etc/shadow").read_bytes()
    os.symlink("/etc/shadow", root / "etc/trap")
    with pytest.raises(ConfigApplyError, match="non-regular file exists there already and overwrite is false"):
        ignition.apply(ign(storage={"files": [{"path": "/etc/trap", "contents": {"source": "data:,x"}}]}), root)
    over = {"path": "/etc/trap", "overwrite": True, "contents": {"source": "data:,x"}}
    ignition.apply(ign(storage={"files": [over]}), root)
    assert not (root / "etc/trap").is_symlink() and (root / "etc/trap").read_text() == "x"
    assert (root / "etc/shadow").read_bytes() == shadow


@pytest.mark.parametrize(("node", "message"), [
    ({"files": [{"path": "/etc", "overwrite": True, "contents": {"source": "data:,x"}}]},
     "obelisk does not delete directory trees"),
    ({"files": [{"path": "/home", "contents": {"source": "data:,x"}}]}, "a directory exists there"),
    ({"directories": [{"path": "/etc/hostname"}]}, "a non-directory already exists there and overwrite is false"),
    ({"directories": [{"path": "/etc", "overwrite": True}]}, "obelisk does not delete directory trees"),
    ({"links": [{"path": "/etc/hostname", "target": "/x"}]}, "a non-symlink already exists at that path"),
    ({"links": [{"path": "/home", "target": "/x", "overwrite": True}]}, "a directory exists there"),
    ({"links": [{"path": "/etc/h2", "target": "/etc/nosuch", "hard": True}]}, "hard link target /etc/nosuch does not"),
    ({"links": [{"path": "/etc/h2", "target": "/home", "hard": True}]}, "hard link target /home is a directory"),
])
def test_what_exists_is_respected(tmp_path: Path, node: dict, message: str) -> None:
    root = fresh_root(tmp_path)
    before = tree(root, skip_marker=False)
    with pytest.raises(ConfigApplyError, match=message):
        ignition.apply(ign(storage=node), root)
    assert tree(root, skip_marker=False) == before


def test_links_that_already_match_are_left_and_overwrite_replaces(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    os.symlink("/usr/share/zoneinfo/UTC", root / "etc/localtime")
    os.link(root / "etc/hostname", root / "etc/hostname2")
    res = ignition.apply(ign(storage={"links": [
        {"path": "/etc/localtime", "target": "/usr/share/zoneinfo//UTC"},
        {"path": "/etc/hostname2", "target": "/etc/hostname", "hard": True}]}), root)
    assert [c.path for c in res.changes] == [MARKER]
    with pytest.raises(ConfigApplyError, match="points to /usr/share/zoneinfo/UTC, not /x, and overwrite is false"):
        ignition.apply(ign(storage={"links": [{"path": "/etc/localtime", "target": "/x"}]}), root, force=True)
    ignition.apply(ign(storage={"links": [{"path": "/etc/localtime", "target": "/x", "overwrite": True},
                                          {"path": "/etc/hostname2", "target": "/etc/motd", "hard": True,
                                           "overwrite": True}],
                                "files": [{"path": "/etc/motd", "contents": {"source": "data:,m"}}]}), root,
                   force=True)
    assert os.readlink(root / "etc/localtime") == "/x"
    assert os.path.samefile(root / "etc/hostname2", root / "etc/motd")


def test_special_mode_bits_are_masked_with_a_warning(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    res = ignition.apply(ign(storage={"files": [{"path": "/opt/suid", "mode": 0o4755, "contents": {
        "source": "data:,x"}}], "directories": [{"path": "/srv/tmp", "mode": 0o1777}]}), root)
    assert _stat(root / "opt/suid") == (0o755, 0, 0) and _stat(root / "srv/tmp") == (0o777, 0, 0)
    assert any("mode 4755 is applied as 0755" in w for w in res.warnings)


def test_symlinks_owner_is_set(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    ignition.apply(ign(storage={"links": [{"path": "/etc/l", "target": "/nowhere", "user": {"id": 1234},
                                           "group": {"name": "docker"}}]}), root)
    st = (root / "etc/l").lstat()
    assert (st.st_uid, st.st_gid) == (1234, 997)


# --- paths stay in the root -----------------------------------------------------------------------

def test_symlinks_in_the_root_are_followed_inside_it(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    outside = tmp_path / "outside"
    os.symlink(str(outside), root / "opt")  # absolute: means <root>/<tmp>/outside on the target
    os.symlink("../../../../../../../../escape", root / "etc/rel")  # .. stops at the root
    ignition.apply(ign(storage={"files": [{"path": "/opt/a/file", "contents": {"source": "data:,a"}},
                                          {"path": "/etc/rel/file", "contents": {"source": "data:,b"}}]}), root)
    assert not outside.exists() and not (tmp_path / "escape").exists()
    assert (root / str(outside).lstrip("/") / "a/file").read_text() == "a"
    assert (root / "escape/file").read_text() == "b"


def test_a_symlink_to_usr_is_refused_and_loops_end(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    os.symlink("/usr/lib", root / "etc/vendor")
    os.symlink("loop2", root / "etc/loop1")
    os.symlink("loop1", root / "etc/loop2")
    before = tree(root, skip_marker=False)
    with pytest.raises(ConfigApplyError, match="resolves to /usr/lib/x .* /usr is the signed read-only image"):
        ignition.apply(ign(storage={"files": [{"path": "/etc/vendor/x", "contents": {"source": "data:,a"}}]}), root)
    with pytest.raises(ConfigApplyError, match="too many levels of symbolic links"):
        ignition.apply(ign(storage={"files": [{"path": "/etc/loop1/x", "contents": {"source": "data:,a"}}]}), root)
    assert tree(root, skip_marker=False) == before


def test_two_paths_that_resolve_to_one_are_refused(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    (root / "var/srv").mkdir(parents=True)
    os.symlink("/var/srv", root / "srv")
    with pytest.raises(ConfigApplyError, match="/var/srv/x resolves to /var/srv/x after following symlinks"):
        ignition.apply(ign(storage={"files": [{"path": "/srv/x", "contents": {"source": "data:,1"}},
                                              {"path": "/var/srv/x", "contents": {"source": "data:,2"}}]}), root)


# --- units ----------------------------------------------------------------------------------------

def test_unmask_disable_templates_and_also(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    sd = root / "etc/systemd/system"
    (sd / "multi-user.target.wants").mkdir(parents=True)
    os.symlink("/dev/null", sd / "docker.service")
    os.symlink("/usr/lib/systemd/system/sshd.service", sd / "multi-user.target.wants/sshd.service")
    echo = "[Service]\nExecStart=/bin/echo %i\n[Install]\nWantedBy=multi-user.target\nAlso=helper.timer\n"
    timer = "[Timer]\nOnBootSec=1\n[Install]\nWantedBy=timers.target\n"
    res = ignition.apply(ign(systemd={"units": [
        {"name": "docker.service", "mask": False},
        {"name": "sshd.service", "enabled": False},
        {"name": "echo@.service", "contents": echo},
        {"name": "helper.timer", "contents": timer},
        {"name": "echo@foo.service", "enabled": True},
        {"name": "echo@bar.service", "enabled": True},
        {"name": "plain.service", "contents": "[Service]\nExecStart=/bin/true\n", "enabled": True},
    ]}), root, live=True, dry_run=True)
    assert res.commands == [["systemctl", "daemon-reload"], ["systemctl", "--no-block", "start", "default.target"]]
    ignition.apply(ign(systemd={"units": [
        {"name": "docker.service", "mask": False}, {"name": "sshd.service", "enabled": False},
        {"name": "echo@.service", "contents": echo}, {"name": "helper.timer", "contents": timer},
        {"name": "echo@foo.service", "enabled": True}, {"name": "echo@bar.service", "enabled": True},
        {"name": "plain.service", "contents": "[Service]\nExecStart=/bin/true\n", "enabled": True}]}), root)
    assert not (sd / "docker.service").is_symlink()
    assert not (sd / "multi-user.target.wants/sshd.service").is_symlink()
    assert os.readlink(sd / "multi-user.target.wants/echo@foo.service") == "/etc/systemd/system/echo@.service"
    assert os.readlink(sd / "multi-user.target.wants/echo@bar.service") == "/etc/systemd/system/echo@.service"
    assert os.readlink(sd / "timers.target.wants/helper.timer") == "/etc/systemd/system/helper.timer"
    assert (root / PRESET.lstrip("/")).read_text() == \
        "enable echo@.service foo bar\nenable plain.service\ndisable sshd.service\n"


def test_enabling_a_unit_that_does_not_exist_changes_nothing(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    before = tree(root, skip_marker=False)
    with pytest.raises(ConfigApplyError, match="cannot enable nosuch.service: there is no unit file"):
        ignition.apply(ign(storage={"files": [{"path": "/etc/x", "contents": {"source": "data:,x"}}]},
                           systemd={"units": [{"name": "nosuch.service", "enabled": True}]}), root)
    assert tree(root, skip_marker=False) == before
    assert ignition.marker_of(root) is None


# --- first boot only ------------------------------------------------------------------------------

def test_first_boot_only_then_force(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    cfg = ign(storage={"files": [{"path": "/etc/once", "contents": {"source": "data:,1"}}]})
    assert not ignition.provisioned_by_ignition(root)
    ignition.apply(cfg, root)
    assert ignition.provisioned_by_ignition(root)
    (root / "etc/once").write_text("changed by the admin")
    again = ignition.apply(cfg, root)
    assert again.provisioned_before and not again.changed and "runs on the first boot only" in again.notes[0]
    assert (root / "etc/once").read_text() == "changed by the admin"
    forced = ignition.apply(ign(storage={"files": [{"path": "/etc/once", "overwrite": True,
                                                    "contents": {"source": "data:,2"}}]}), root, force=True)
    assert forced.changed and (root / "etc/once").read_text() == "2"
    assert "previousReport" in ignition.marker_of(root)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    before = tree(root, skip_marker=False)
    res = ignition.apply(ign("3.4.0", **FULL), root, dry_run=True)
    assert res.dry_run and len(res.changes) > 20
    assert res.changes[0].describe(planned=True).startswith("would write /etc/passwd")
    assert tree(root, skip_marker=False) == before


def test_a_marker_that_says_no_user_config(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    (root / MARKER.lstrip("/")).write_text('{"userConfigProvided": false}')
    assert not ignition.provisioned_by_ignition(root)
    assert ignition.apply(ign(), root).provisioned_before


@pytest.mark.parametrize("raw", [
    b"", b"#cloud-config\nhostname: x\n", b"{", b'{"ignition": {"version": "2.3.0"}}', b"\x1f\x8b junk",
    b'{"ignition": {"version": "3.4.0"}, "storage": {"files": [{"path": "/etc/../x"}]}}',
])
def test_invalid_input_raises_invalid_ignition_and_changes_nothing(tmp_path: Path, raw: bytes) -> None:
    root = fresh_root(tmp_path)
    before = tree(root, skip_marker=False)
    with pytest.raises(InvalidIgnition) as exc:
        ignition.apply(raw, root)
    assert exc.value.report.errors and "nothing was changed" in str(exc.value)
    assert tree(root, skip_marker=False) == before
