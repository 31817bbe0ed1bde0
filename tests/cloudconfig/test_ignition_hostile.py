"""Hostile configs: each is answered with one clear report line or error, never a traceback or a hang,
and never a change to the root."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest
from test_ignition_support import data_url, fresh_root, ign, tree

from cloudconfig import ignition
from cloudconfig.ignition import InvalidIgnition
from cloudconfig.rootfs import ConfigApplyError

pytestmark = pytest.mark.timeout(120)


def _only_error(raw: bytes) -> str:
    rep = ignition.validate(raw)
    assert not rep.ok, rep.entries
    return rep.errors[0].text()


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"ignition": {"version": "3.4.0"}, "a": ' + b"[" * 100 + b"]" * 100 + b"}",
     "line 1 column 105: error: JSON syntax error: nested more than 64 levels deep"),
    (b'{"ignition": {"version": "3.4.0"}, "a": ' + b"9" * 5000 + b"}",
     "line 1 column 41: error: JSON syntax error: a number of 5000 digits"),
    (b'{"ignition": {"version": "3.4.0"}, "a": 1e999999}', None),  # inf: only a warning (unknown key)
    (b"variant: fcos\nversion: 1.5.0\na: " + b"[" * 100 + b"]" * 100, "YAML is nested"),
    (b'{"ignition": {"version": "3.4.0"}}' + b" " * (17 * 1024 * 1024),
     "16777216"),
    (gzip.compress(b" " * (20 * 1024 * 1024)), "decompressed"),
    (b'{"ignition": {"version": "3.4.0"}, "x": "\xff\xfe"}', "not UTF-8"),
    (b'{"ignition": {"version": "3.4.0"}, "storage": {"files": [{"path": "/etc/a\\u0000b"}]}}', "NUL character"),
    (b"variant: fcos\nversion: 1.5.0\nstorage: !!python/object/apply:os.system [ls]\n", "must be an object"),
    (b"variant: fcos\nversion: 1.5.0\nstorage: !!python/object:os.system x\n", "must be an object"),
    (b"variant: fcos\nversion: 1.5.0\nstorage:\n  <<: {files: []}\n", "YAML merge keys (<<) are not supported"),
])
def test_hostile_text_is_one_clear_line(raw: bytes, expected: str | None) -> None:
    start = time.monotonic()
    rep = ignition.validate(raw)
    assert time.monotonic() - start < 10
    if expected is None:
        assert all("\n" not in e.message for e in rep.entries)
        return
    assert not rep.ok and expected in rep.errors[0].text(), rep.entries
    assert all("\n" not in e.message for e in rep.entries)


def test_a_lone_surrogate_becomes_a_replacement_character(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    ignition.apply(b'{"ignition": {"version": "3.4.0"}, "storage": {"files": [{"path": "/etc/\\ud800x"}]}}', root)
    assert (root / "etc/\ufffdx").exists()


def test_merge_fan_out_is_bounded(tmp_path: Path) -> None:
    """Each config merges two copies of the next: 2**8 configs without the bound."""
    cfg = ign()
    for _ in range(8):
        cfg = ign(ignition={"version": "3.4.0", "config": {"merge": [{"source": data_url(cfg)},
                                                                     {"source": data_url(cfg + b" ")}]}})
    root = fresh_root(tmp_path)
    before = tree(root, skip_marker=False)
    start = time.monotonic()
    with pytest.raises(ConfigApplyError, match="more than 32 configs referenced in all"):
        ignition.apply(cfg, root)
    assert time.monotonic() - start < 20 and tree(root, skip_marker=False) == before


def test_a_data_url_config_referencing_itself_ends(tmp_path: Path) -> None:
    inner = ign()
    for _ in range(10):
        inner = ign(ignition={"version": "3.4.0", "config": {"replace": {"source": data_url(inner)}}})
    with pytest.raises(ConfigApplyError, match="more than 8 levels deep"):
        ignition.apply(inner, fresh_root(tmp_path))


@pytest.mark.parametrize("user", [
    {"name": "evil", "gecos": "x:0:0::/root:/bin/sh\nroot2"},
    {"name": "evil\nroot2:x:0:0::/:/bin/sh"},
    {"name": "evil", "homeDir": "/home/e:0:0"},
    {"name": "evil", "shell": "/bin/sh\nroot2:x:0:0::/:/bin/sh"},
    {"name": "evil", "passwordHash": "x\nroot2::0:0:::"},
    {"name": "evil", "groups": ["sudo,root"]},
    {"name": "evil", "primaryGroup": "x:1"},
])
def test_passwd_lines_cannot_be_forged(tmp_path: Path, user: dict) -> None:
    root = fresh_root(tmp_path)
    before = tree(root, skip_marker=False)
    with pytest.raises(InvalidIgnition):
        ignition.apply(ign(passwd={"users": [user]}), root)
    assert tree(root, skip_marker=False) == before


@pytest.mark.parametrize("name", ["../../../etc/shadow.service", "a/b.service", ".service", "a b.service",
                                  "x.service\n"])
def test_unit_names_cannot_leave_the_unit_directory(name: str) -> None:
    assert "unit" in _only_error(ign(systemd={"units": [{"name": name, "contents": "[Unit]\n"}]}))


@pytest.mark.parametrize("dropin", ["../../../../etc/cron.d/x.conf", "a/b.conf", "\n.conf"])
def test_dropin_names_cannot_leave_the_dropin_directory(dropin: str) -> None:
    assert "drop-in name" in _only_error(ign(systemd={"units": [{"name": "a.service", "dropins": [
        {"name": dropin, "contents": "[Unit]\n"}]}]}))


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\0b"])
def test_http_headers_cannot_inject(value: str) -> None:
    assert "one line" in _only_error(ign(storage={"files": [{"path": "/etc/a", "contents": {
        "source": "https://h/x", "httpHeaders": [{"name": "A", "value": value}]}}]}))


def test_a_huge_file_list_is_validated_quickly() -> None:
    files = [{"path": f"/etc/f/{i}", "contents": {"source": "data:,x"}} for i in range(20000)]
    start = time.monotonic()
    rep = ignition.validate(json.dumps({"ignition": {"version": "3.4.0"}, "storage": {"files": files}}).encode())
    assert rep.ok and time.monotonic() - start < 20


@pytest.mark.parametrize(("link", "target"), [
    ("root/.ssh", "/etc"),  # keys would be written into /etc
    ("root/.ssh/authorized_keys", "/etc/shadow"),  # shadow would be copied to old_authorized_keys
    ("root/.ssh/authorized_keys.d", "/etc/cron.d"),
])
def test_symlinks_below_a_home_are_not_followed(tmp_path: Path, link: str, target: str) -> None:
    root = fresh_root(tmp_path)
    (root / "root/.ssh").mkdir(parents=True) if link != "root/.ssh" else (root / "root").mkdir()
    (root / "etc/cron.d").mkdir()
    os.symlink(target, root / link)
    before = tree(root, skip_marker=False)
    with pytest.raises(ConfigApplyError, match=r"ssh keys of root: /root/\.ssh\S* in .* is a symlink \(to "):
        ignition.apply(ign(passwd={"users": [{"name": "root", "sshAuthorizedKeys": ["ssh-ed25519 K"]}]}), root)
    assert tree(root, skip_marker=False) == before
