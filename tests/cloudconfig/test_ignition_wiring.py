"""One engine for the user: `obelisk cloudconfig validate|apply` recognise Ignition and Butane and hand
them to cloudconfig.ignition; a host provisioned by Ignition gets no cloud-config on top (Flatcar's
rule); the kernel command line's ignition.config.url= is a datasource. Through typer's runner into
temporary roots, with a real HTTP server on 127.0.0.1 for the URL source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cloudconfig_helpers import tree_digest
from test_ignition_support import CORPUS, FILES, fresh_root, ign, serving
from typer.testing import CliRunner

from cloudconfig import ignition
from cloudconfig.cli import app
from cloudconfig.validate import MAX_USERDATA

pytestmark = pytest.mark.timeout(60)
runner = CliRunner()
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK core@example"
IGN = ign(passwd={"users": [{"name": "core", "sshAuthorizedKeys": [KEY]}]},
          storage={"files": [{"path": "/etc/motd", "mode": 420, "contents": {"source": "data:,provisioned%0A"}}]})


def _file(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _apply(root: Path, *args: str) -> object:
    return runner.invoke(app, ["apply", "--root", str(root), *args])


def test_apply_an_ignition_file_then_first_boot_only_then_force(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    cfg = _file(tmp_path, "config.ign", IGN)
    res = _apply(root, str(cfg))
    assert res.exit_code == 0, res.output
    assert "wrote /etc/motd (mode 0644, 12 bytes) [storage.files]" in res.stdout
    assert res.stdout.rstrip().endswith(f"change(s) to {root} from file ({cfg})")
    assert (root / "etc/motd").read_text() == "provisioned\n"
    assert (root / "home/core/.ssh/authorized_keys").read_text() == KEY + "\n"
    marker = ignition.marker_of(root)
    assert marker is not None and marker["provisionedBy"] == "obelisk" and marker["configKind"] == "ignition"
    digest = tree_digest(root)
    again = _apply(root, "--json", str(cfg))
    doc = json.loads(again.stdout)
    assert again.exit_code == 0 and doc["skipped"] is True and doc["changed"] is False and doc["kind"] == "ignition"
    assert any("runs on the first boot only" in n for n in doc["notes"])
    assert tree_digest(root) == digest
    (root / "etc/motd").unlink()  # overwrite is false: a file there would be an error, as in Ignition
    forced = _apply(root, "--force", str(cfg))
    assert forced.exit_code == 0 and "wrote /etc/motd" in forced.stdout
    assert (root / "etc/motd").read_text() == "provisioned\n"
    assert "previousReport" in (ignition.marker_of(root) or {})


def test_apply_butane_with_a_files_dir(tmp_path: Path) -> None:
    bu = str(CORPUS / "78-flatcar-1.1.0-local-trees.bu")
    root = fresh_root(tmp_path)
    digest = tree_digest(root)
    bad = _apply(root, bu)  # without -d the local files cannot be found
    assert bad.exit_code == 1
    lines = bad.stderr.strip().splitlines()
    assert lines[0].startswith("line ") and "/passwd/users/0/ssh_authorized_keys_local" in bad.stderr
    assert lines[-1] == f"error: {bu} has {len(lines) - 1} error(s); nothing was changed"
    assert tree_digest(root) == digest
    res = _apply(root, "--files-dir", str(FILES), bu)
    assert res.exit_code == 0, res.output
    assert (root / "etc/systemd/system/app.service").read_bytes() == (FILES / "units/app.service").read_bytes()
    assert (root / "etc/systemd/system/multi-user.target.wants/app.service").is_symlink()
    assert (ignition.marker_of(root) or {})["configKind"] == "butane"


@pytest.mark.parametrize("userdata", [
    "#cloud-config\nhostname: not-applied\n",
    "#cloud-config\nhostname: [broken\n",  # not even validated: nothing of it is applied
    "#!/bin/sh\ntouch /should-not-run\n",
    "",
], ids=["cloud-config", "invalid-cloud-config", "script", "empty"])
def test_a_root_provisioned_by_ignition_gets_no_cloud_config(userdata: str, tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    assert _apply(root, str(_file(tmp_path, "c.ign", IGN))).exit_code == 0
    when = (ignition.marker_of(root) or {})["provisioningDate"]
    digest = tree_digest(root)
    res = _apply(root, str(_file(tmp_path, "user-data", userdata)))
    assert res.exit_code == 0, res.output
    assert res.stdout == (f"note: {root}/etc/.ignition-result.json: provisioned by Ignition at {when}: cloud-config "
                          "is not applied on top (Flatcar's rule)\n")
    assert tree_digest(root) == digest
    doc = json.loads(_apply(root, "--json", str(_file(tmp_path, "user-data", userdata))).stdout)
    assert doc["skipped"] is True and doc["changes"] == []


def test_a_result_file_without_a_user_config_does_not_stop_cloud_config(tmp_path: Path) -> None:
    """Ignition writes userConfigProvided: false when it ran with no config; Flatcar then runs cloud-config."""
    root = fresh_root(tmp_path)
    (root / "etc/.ignition-result.json").write_text('{"userConfigProvided": false}\n')
    res = _apply(root, str(_file(tmp_path, "user-data", "#cloud-config\nhostname: applied\n")))
    assert res.exit_code == 0 and (root / "etc/hostname").read_text() == "applied\n"


def test_ignition_only_leaves_anything_else_alone(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    digest = tree_digest(root)
    cc = _apply(root, "--ignition-only", str(_file(tmp_path, "user-data", "#cloud-config\nhostname: x\n")))
    assert cc.exit_code == 0 and cc.stdout == ""
    assert "is not an Ignition or Butane config; nothing to do (--ignition-only)" in cc.stderr
    assert tree_digest(root) == digest
    ign_res = _apply(root, "--ignition-only", str(_file(tmp_path, "c.ign", IGN)))
    assert ign_res.exit_code == 0 and (root / "etc/motd").exists()


def _cmdline(tmp_path: Path, text: str) -> list[str]:
    """apply's options for the URL source only, with this kernel command line."""
    cmd = _file(tmp_path, "cmdline", text + "\n")
    return ["--datasource", "url", "--cmdline", str(cmd), "--attempts", "1", "--timeout", "5"]


@pytest.mark.parametrize("key", ["ignition.config.url", "flatcar.config.url", "coreos.config.url"])
def test_ignition_config_url_on_the_kernel_command_line(key: str, tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    with serving() as s:
        url = s.add("/ignition?mac=52-54-00-aa-bb-cc", IGN)
        res = _apply(root, "--ignition-only", *_cmdline(tmp_path, f"console=ttyS0 cloud-config-url={s.url('/cc')} "
                                                                   f"{key}={url} quiet"))
        assert res.exit_code == 0, res.output
        assert res.stdout.rstrip().endswith(f"from url ({url})")
        assert (root / "etc/motd").read_text() == "provisioned\n"
        assert s.routes["/ignition?mac=52-54-00-aa-bb-cc"].hits == 1
        # the cloud-config unit on the next boot reads the same URL: provisioned already, nothing done
        digest = tree_digest(root)
        again = _apply(root, *_cmdline(tmp_path, f"{key}={url}"))
        assert again.exit_code == 0 and "runs on the first boot only" in again.stdout
        assert tree_digest(root) == digest


def test_ignition_config_url_is_bounded_like_the_other_url_sources(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    digest = tree_digest(root)
    with serving() as s:
        big = s.add("/big.ign", b" " * (MAX_USERDATA + 1))
        res = _apply(root, *_cmdline(tmp_path, f"ignition.config.url={big}"))
        assert res.exit_code != 0 and f"larger than {MAX_USERDATA} bytes" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        missing = _apply(root, "--ignition-only", *_cmdline(tmp_path, f"ignition.config.url={s.url('/nope')}"))
        assert missing.exit_code == 0 and "nothing to do" in missing.stderr  # 4xx: no user-data
        other = _apply(root, *_cmdline(tmp_path, "ignition.config.url=tftp://10.0.0.1/x.ign"))
        assert other.exit_code == 2 and "only http:// and https:// URLs are fetched" in other.stderr
    assert tree_digest(root) == digest


def test_validate_mixes_cloud_config_ignition_and_butane(tmp_path: Path) -> None:
    cc = _file(tmp_path, "cc.yaml", "#cloud-config\nhostnme: x\n")
    bad_ign = CORPUS / "31-modes.ign"
    bu = CORPUS / "78-flatcar-1.1.0-local-trees.bu"
    res = runner.invoke(app, ["validate", "--json", "-d", str(FILES), str(cc), str(bad_ign), str(bu)])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    files = {e["file"] for e in doc}
    assert files == {str(cc), str(bad_ign)}  # the Butane config with its files dir is clean
    assert all(set(e) == {"file", "line", "column", "level", "path", "message"} for e in doc)
    assert any(e["file"] == str(bad_ign) and e["path"] == "/storage/files/0/mode" and e["line"] == 9 for e in doc)
    assert any(e["file"] == str(cc) and e["level"] == "warning" for e in doc)
    only_warnings = runner.invoke(app, ["validate", str(CORPUS / "21-unknown-keys.ign")])
    assert only_warnings.exit_code == 0 and "warning: /ignition/timeout" in only_warnings.stdout
    assert runner.invoke(app, ["validate", "--strict", str(CORPUS / "21-unknown-keys.ign")]).exit_code == 1
