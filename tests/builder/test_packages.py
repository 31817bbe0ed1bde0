"""The package manifest: read from dpkg's status and Python dist-info, kept in the image, the release
folder and release.json, shown by `obelisk image inspect --packages`; the definition's [units]."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bhelpers import Built, obelisk, one_line_error

from builder import packages
from builder.definition import DefinitionError, load
from builder.stages import tree as tree_stage

STATUS = """Package: openssh-server
Status: install ok installed
Architecture: amd64
Source: openssh
Version: 1:9.2p1-2+deb12u3
Description: secure shell (SSH) server
 a continuation line: Package: not-a-package

Package: libc6
Status: install ok installed
Architecture: amd64
Source: glibc (2.36-9+deb12u4)
Version: 2.36-9+deb12u4

Package: removed-one
Status: deinstall ok config-files
Version: 1.0

Package: sudo
Status: install ok installed
Architecture: amd64
Version: 1.9.13p3-1+deb12u1
"""


def test_dpkg_status_gives_installed_packages_with_their_source() -> None:
    pkgs = {p.name: p for p in packages.parse_dpkg_status(STATUS)}
    assert sorted(pkgs) == ["libc6", "openssh-server", "sudo"]
    assert pkgs["openssh-server"].source == "openssh (1:9.2p1-2+deb12u3)"  # same version as the binary
    assert pkgs["libc6"].source == "glibc (2.36-9+deb12u4)"
    assert pkgs["sudo"].source == "sudo (1.9.13p3-1+deb12u1)" and pkgs["sudo"].arch == "amd64"


@pytest.mark.parametrize("text", ["", "\n\n\n", "garbage without colons", "Package:\nStatus:", "\x00\xff" * 50,
                                  "Package: x\nStatus: install ok installed\n" + "Version: " + "9" * 10000])
def test_hostile_status_files_do_not_raise(text: str) -> None:
    for p in packages.parse_dpkg_status(text):
        assert isinstance(p.name, str)


def test_python_dists_and_tree_manifest(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").write_text(STATUS)
    meta = tree / "usr/lib/obelisk/python/pydantic-2.5.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: pydantic\nVersion: 2.5.0\n\nbody\n")
    pkgs = packages.read_tree(tree)
    assert packages.Package("pydantic", "2.5.0", "pypi", "python") in pkgs
    path = packages.write_manifest(tree, pkgs)
    data = json.loads(path.read_text())
    assert data["format"] == 1 and len(data["packages"]) == 4


def test_release_carries_the_manifest(tiny: Built) -> None:
    rel = dict(tiny.release_json)
    names = {p["name"] for p in rel["packages"]}
    assert {"busybox-static"} <= names and any(n.startswith("linux-image-") for n in names), names
    on_disk = json.loads((tiny.release / "packages.json").read_text())
    assert on_disk["packages"] == rel["packages"]
    assert "packages.json" in (tiny.release / "SHA256SUMS").read_text()
    proc = obelisk("image", "verify", tiny.release, "--key", tiny.pub)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = obelisk("image", "inspect", tiny.release, "--packages", "--json", check=True)
    listed = json.loads(out.stdout)["packages"]
    assert {p["name"] for p in listed} == names
    table = obelisk("image", "inspect", tiny.release, "--packages", check=True).stdout
    assert "busybox-static" in table and "file" in table


def test_inspect_packages_refuses_what_has_no_manifest(tiny: Built, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    rel = dict(tiny.release_json)
    del rel["packages"]
    (old / "release.json").write_text(json.dumps(rel))
    proc = obelisk("image", "inspect", old, "--packages")
    assert proc.returncode != 0 and "no package manifest" in one_line_error(proc)
    rel["packages"] = [{"name": 1}]
    (old / "release.json").write_text(json.dumps(rel))
    proc = obelisk("image", "inspect", old, "--packages")
    assert proc.returncode != 0 and "damaged" in one_line_error(proc)
    shutil.copy(tiny.release / "disk.raw", tmp_path / "disk.raw")
    proc = obelisk("image", "inspect", tmp_path / "disk.raw", "--packages")
    assert proc.returncode != 0 and "release folder" in one_line_error(proc)


def _tree_with_unit(tmp_path: Path, text: str) -> Path:
    tree = tmp_path / "tree"
    units = tree / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (units / "ssh.service").write_text(text)
    return tree


def test_units_enable_in_usr_and_disable_everywhere(tmp_path: Path) -> None:
    tree = _tree_with_unit(tmp_path, "[Service]\nExecStart=/x\n[Install]\nWantedBy=multi-user.target\n")
    (tree / "usr/lib/systemd/system/etcd.service").write_text("[Install]\nWantedBy=multi-user.target\n")
    etc = tree / "etc/systemd/system/multi-user.target.wants"
    etc.mkdir(parents=True)
    (etc / "etcd.service").symlink_to("/lib/systemd/system/etcd.service")
    (tree / "etc/systemd/system/etcd2.service").symlink_to("/lib/systemd/system/etcd.service")  # alias stays
    tree_stage.apply_unit_choices(tree, ["ssh.service"], ["etcd.service"])
    assert (tree / "usr/lib/systemd/system/multi-user.target.wants/ssh.service").is_symlink()
    assert not (etc / "etcd.service").is_symlink()
    assert (tree / "etc/systemd/system/etcd2.service").is_symlink()


def test_units_enable_refuses_missing_or_uninstallable(tmp_path: Path) -> None:
    tree = _tree_with_unit(tmp_path, "[Service]\nExecStart=/x\n")
    with pytest.raises(Exception, match="no WantedBy"):
        tree_stage.apply_unit_choices(tree, ["ssh.service"], [])
    with pytest.raises(Exception, match="add the package"):
        tree_stage.apply_unit_choices(tree, ["podman.service"], [])


def test_machine_identity_is_stripped(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc/ssh").mkdir(parents=True)
    for n in ("ssh_host_rsa_key", "ssh_host_rsa_key.pub", "ssh_host_ed25519_key"):
        (tree / "etc/ssh" / n).write_text("secret")
    (tree / "etc/ssh/sshd_config").write_text("Port 22\n")
    (tree / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    removed = tree_stage.strip_machine_identity(tree)
    assert sorted(p.name for p in (tree / "etc/ssh").iterdir()) == ["sshd_config"]
    assert (tree / "etc/machine-id").read_text() == "" and "etc/machine-id" in removed


@pytest.mark.parametrize("units, needle", [
    ('enable = ["ssh"]', "not a systemd unit name"),
    ('enable = ["../x.service"]', "not a systemd unit name"),
    ('enable = ["a.service"]\ndisable = ["a.service"]', "both"),
    ('start = ["a.service"]', "start"),
])
def test_bad_units_sections(tmp_path: Path, units: str, needle: str) -> None:
    d = tmp_path / "x.toml"
    d.write_text(f'name = "x"\n[source]\nkind = "tiny"\n[units]\n{units}\n')
    with pytest.raises(DefinitionError, match=needle):
        load(d)
