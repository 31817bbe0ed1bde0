"""Ignition and Butane through `obelisk cloudconfig validate|translate|apply` (typer's runner): output, --json,
exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_ignition_support import CORPUS, FILES, fresh_root, ign, serving
from typer.testing import CliRunner

from cloudconfig.cli import app

pytestmark = pytest.mark.timeout(60)
runner = CliRunner()


def test_validate_prints_the_report_and_exits_1_on_errors() -> None:
    res = runner.invoke(app, ["validate", str(CORPUS / "31-modes.ign")])
    assert res.exit_code == 1
    assert res.stdout == "".join(ln + "\n" for ln in
                                 (CORPUS / "31-modes.ign.expected").read_text().splitlines()[1:])
    ok = runner.invoke(app, ["validate", str(CORPUS / "01-v3.0.0-basic.ign"), str(CORPUS / "70-fcos-1.0.0-inline.bu")])
    assert ok.exit_code == 0 and ok.stdout == ""


def test_validate_json_is_cloud_configs_shape_and_strict_counts_warnings() -> None:
    res = runner.invoke(app, ["validate", "--json", str(CORPUS / "21-unknown-keys.ign")])
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc[0] == {"line": 2, "column": 36, "level": "warning", "path": "/ignition/timeout",
                      "message": 'unrecognized key "timeout" (did you mean "timeouts"?); it is ignored'}
    assert runner.invoke(app, ["validate", "--strict", str(CORPUS / "21-unknown-keys.ign")]).exit_code == 1


def test_validate_with_files_dir_and_a_missing_file(tmp_path: Path) -> None:
    bu = str(CORPUS / "78-flatcar-1.1.0-local-trees.bu")
    assert runner.invoke(app, ["validate", bu]).exit_code == 1
    assert runner.invoke(app, ["validate", "-d", str(FILES), bu]).exit_code == 0
    missing = runner.invoke(app, ["validate", str(tmp_path / "nope.ign")])
    assert missing.exit_code == 2 and "nope.ign" in missing.stderr
    os.mkfifo(tmp_path / "fifo")
    fifo = runner.invoke(app, ["validate", str(tmp_path / "fifo")])
    assert fifo.exit_code == 2 and "is a FIFO" in fifo.stderr


def test_translate(tmp_path: Path) -> None:
    res = runner.invoke(app, ["translate", "-d", str(FILES), str(CORPUS / "80-pair.bu")])
    assert res.exit_code == 0 and json.loads(res.stdout)["ignition"] == {"version": "3.4.0"}
    out = tmp_path / "out.ign"
    written = runner.invoke(app, ["translate", "-d", str(FILES), "-o", str(out), str(CORPUS / "80-pair.bu")])
    assert written.exit_code == 0
    assert json.loads(out.read_text()) == json.loads(res.stdout)
    bad = runner.invoke(app, ["translate", str(CORPUS / "79-butane-types.bu")])
    assert bad.exit_code == 1 and "not translated (6 error(s), 3 warning(s))" in bad.stderr
    assert "line 6 column 13: error: /storage/files/0/mode" in bad.stderr


def test_apply_dry_run_then_apply_then_first_boot_only(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    cfg = tmp_path / "c.ign"
    cfg.write_bytes(ign(storage={"files": [{"path": "/etc/motd", "contents": {"source": "data:,hi"}}]}))
    dry = runner.invoke(app, ["apply", "--root", str(root), "--dry-run", str(cfg)])
    assert dry.exit_code == 0 and "would write /etc/motd (mode 0644, 2 bytes)" in dry.stdout
    assert not (root / "etc/motd").exists()
    res = runner.invoke(app, ["apply", "--root", str(root), "--json", str(cfg)])
    assert res.exit_code == 0 and json.loads(res.stdout)["changed"] is True
    again = runner.invoke(app, ["apply", "--root", str(root), str(cfg)])
    assert again.exit_code == 0 and "runs on the first boot only" in again.stdout


def test_apply_errors_are_one_line_after_the_report(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    bad = runner.invoke(app, ["apply", "--root", str(root), str(CORPUS / "30-paths.ign")])
    assert bad.exit_code == 1
    lines = bad.stderr.splitlines()
    assert lines[0].startswith("line 8 column 17: error: /storage/files/0/path")
    assert lines[-1].endswith("30-paths.ign has 9 error(s); nothing was changed")
    with serving() as s:
        cfg = tmp_path / "remote.ign"
        cfg.write_bytes(ign(storage={"files": [{"path": "/etc/x", "contents": {"source": s.url("/missing")}}]}))
        res = runner.invoke(app, ["apply", "--attempts", "1", "--root", str(root), str(cfg)])
    assert res.exit_code == 1 and res.stderr.strip().endswith("HTTP 404 Not Found")
    assert not (root / "etc/x").exists()
