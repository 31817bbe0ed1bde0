"""Butane read directly: the Ignition it stands for, the same applied tree, local files and trees
confined to the files dir, and the version map of the real Butane."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from test_ignition_support import CORPUS, FILES, fresh_root, tree

from cloudconfig import ignition
from cloudconfig.ignition import InvalidIgnition
from cloudconfig.ignition.butane import VARIANTS, make_data_url
from cloudconfig.ignition.fetch import gunzip, parse_data_url

pytestmark = pytest.mark.timeout(60)


def test_version_map_is_the_real_butanes() -> None:
    """coreos/butane config/config.go: RegisterTranslator(variant, version, ToIgnX_Y)."""
    assert VARIANTS == {
        "fcos": {"1.0.0": (3, 0), "1.1.0": (3, 1), "1.2.0": (3, 2), "1.3.0": (3, 2), "1.4.0": (3, 3),
                 "1.5.0": (3, 4)},
        "flatcar": {"1.0.0": (3, 3), "1.1.0": (3, 4)}}
    for variant, versions in VARIANTS.items():
        for version, spec in versions.items():
            out, rep = ignition.translate(f"variant: {variant}\nversion: {version}\n".encode())
            assert rep.ok and json.loads(out or b"") == {"ignition": {"version": f"{spec[0]}.{spec[1]}.0"}}


@pytest.mark.parametrize("pair", ["80-pair"])
def test_butane_and_its_ignition_give_the_same_tree(tmp_path: Path, pair: str) -> None:
    a, b = fresh_root(tmp_path, "from-butane"), fresh_root(tmp_path, "from-ignition")
    ignition.apply((CORPUS / f"{pair}.bu").read_bytes(), a, files_dir=FILES)
    ignition.apply((CORPUS / f"{pair}.ign").read_bytes(), b)
    ta, tb = tree(a), tree(b)
    assert ta == tb
    assert ta["/opt/app/run.sh"][:2] == ("file", 0o755) and ta["/opt/app/current"][4] == "run.sh"
    assert ta["/etc/app/app.conf"][1:4] == (0o640, 0, 2000)
    assert ta["/home/core/.ssh/authorized_keys.d/ignition"][4] == (FILES / "keys/core.pub").read_bytes().replace(
        b"\n\n", b"\n")
    assert json.loads((a / "etc/.ignition-result.json").read_text())["configVersion"] == "flatcar 1.1.0"


def test_translated_butane_is_the_ignition_butane_prints(tmp_path: Path) -> None:
    out, rep = ignition.translate((CORPUS / "70-fcos-1.0.0-inline.bu").read_bytes())
    assert rep.ok and rep.kind == "butane" and rep.spec == "3.0.0"
    assert json.loads(out or b"") == {
        "ignition": {"version": "3.0.0"},
        "passwd": {"users": [{"name": "core", "sshAuthorizedKeys": [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey1 core@laptop"]}]},
        "storage": {"directories": [{"path": "/var/lib/app", "mode": 0o750}],
                    "files": [{"path": "/etc/motd", "mode": 0o644,
                               "contents": {"source": "data:,Welcome%20to%20obelisk%0A"}}],
                    "links": [{"path": "/etc/localtime", "target": "/usr/share/zoneinfo/UTC"}]},
        "systemd": {"units": [{"name": "hello.service", "enabled": True, "contents":
                               "[Service]\nType=oneshot\nExecStart=/usr/bin/echo hello\n[Install]\n"
                               "WantedBy=multi-user.target\n"}]}}
    # the translated JSON is itself a valid Ignition config that applies to the same tree
    a, b = fresh_root(tmp_path, "a"), fresh_root(tmp_path, "b")
    ignition.apply((CORPUS / "70-fcos-1.0.0-inline.bu").read_bytes(), a)
    ignition.apply(out or b"", b)
    assert tree(a) == tree(b)


@pytest.mark.parametrize(("contents", "compression", "want_comp"), [
    (b"short text", None, ""),
    (b"\x00\x01\x02\xff" * 3, None, ""),
    (b"all work and no play " * 100, None, "gzip"),
    (b"already gzipped by the user", "gzip", None),
])
def test_data_urls_are_butanes_smallest_encoding(contents: bytes, compression: str | None,
                                                 want_comp: str | None) -> None:
    url, comp = make_data_url(contents, compression)
    assert comp == want_comp
    data = parse_data_url(url)
    assert (gunzip(data) if comp == "gzip" else data) == contents


def test_local_files_and_trees_stay_in_the_files_dir(tmp_path: Path) -> None:
    files = tmp_path / "files"
    (files / "t").mkdir(parents=True)
    (tmp_path / "secret").write_text("outside")
    os.symlink(str(tmp_path / "secret"), files / "leak")  # a symlink out of the files dir
    os.symlink("../../secret", files / "t/leak-in-tree")  # in a tree: copied as a link, never followed
    os.mkfifo(files / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(files / "t/sock"))
    try:
        bu = (b"variant: flatcar\nversion: 1.1.0\nstorage:\n  files:\n"
              b"    - path: /etc/a\n      contents:\n        local: leak\n"
              b"    - path: /etc/b\n      contents:\n        local: fifo\n"
              b"    - path: /etc/c\n      contents:\n        local: /../../secret\n"
              b"  trees:\n    - local: t\n      path: /opt/t\n    - local: ../\n")
        rep = ignition.validate(bu, files_dir=files)
        assert [e.text() for e in rep.entries] == [
            "line 7 column 16: error: /storage/files/0/contents/local: local file path traverses outside the "
            "files directory",
            "line 10 column 16: error: /storage/files/1/contents/local: fifo: is a FIFO, not a local file: give a "
            "regular file",
            "line 13 column 16: error: /storage/files/2/contents/local: local file path traverses outside the "
            "files directory",
            "line 15 column 7: error: /storage/trees/0: sock: trees may only contain files, directories, and "
            "symlinks",
            "line 17 column 7: error: /storage/trees/1: local file path traverses outside the files directory"]
        ok, rep = ignition.translate(b"variant: flatcar\nversion: 1.1.0\nstorage:\n  trees:\n    - local: t\n"
                                     b"      path: /opt/t\n", files_dir=files)
        assert ok is None  # the socket is still there
    finally:
        sock.close()
    (files / "t/sock").unlink()
    out, rep = ignition.translate(b"variant: flatcar\nversion: 1.1.0\nstorage:\n  trees:\n    - local: t\n"
                                  b"      path: /opt/t\n", files_dir=files)
    assert rep.ok and json.loads(out or b"")["storage"] == {"links": [{"path": "/opt/t/leak-in-tree",
                                                                       "target": "../../secret"}]}


def test_local_without_a_files_dir(tmp_path: Path) -> None:
    bu = (CORPUS / "78-flatcar-1.1.0-local-trees.bu").read_bytes()
    rep = ignition.validate(bu)
    assert [e.message for e in rep.errors] == [
        "local file paths are relative to a files directory that must be specified (--files-dir)"] * 3
    with pytest.raises(InvalidIgnition, match="3 error"):
        ignition.apply(bu, fresh_root(tmp_path))


def test_a_tree_fills_a_listed_file_but_not_one_with_contents(tmp_path: Path) -> None:
    bu = (b"variant: flatcar\nversion: 1.1.0\nstorage:\n  trees:\n    - local: tree\n  files:\n"
          b"    - path: /etc/app/app.conf\n      contents:\n        inline: mine\n")
    rep = ignition.validate(bu, files_dir=FILES)
    assert [e.text() for e in rep.entries] == [
        "line 5 column 7: error: /storage/trees/0: /etc/app/app.conf: matching filesystem node has existing "
        "contents or different type"]


def test_yaml_alias_bomb_is_bounded() -> None:
    lines = ["variant: fcos", "version: 1.5.0", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 9)]
    rep = ignition.validate("\n".join(lines).encode())
    assert rep.errors[0].message.startswith("YAML expands to more than")


def test_butane_with_a_bom_gzip_and_crlf() -> None:
    import gzip
    text = "\ufeffvariant: fcos\r\nversion: 1.5.0\r\nstorage:\r\n  files:\r\n    - path: /etc/x\r\n"
    rep = ignition.validate(gzip.compress(text.encode()))
    assert rep.ok and rep.value == {"ignition": {"version": "3.4.0"}, "storage": {"files": [{"path": "/etc/x"}]}}
