"""`obelisk cloudconfig validate`: the corpus of configs and their expected reports, line numbers included."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudconfig.cli import app
from cloudconfig.validate import validate_bytes

CORPUS = Path(__file__).parent / "corpus"
CONFIGS = sorted(p for p in CORPUS.iterdir() if p.suffix != ".expected")
runner = CliRunner()


def test_corpus_is_big_enough() -> None:
    assert len(CONFIGS) >= 40
    invalid = [p for p in CONFIGS if "error:" in p.with_suffix(".expected").read_text()]
    assert len(invalid) >= 20 and len(CONFIGS) - len(invalid) >= 20


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_corpus_report(config: Path) -> None:
    expected = config.with_suffix(".expected").read_text()
    res = runner.invoke(app, ["validate", str(config)])
    assert res.stdout == expected
    assert res.exit_code == (1 if "error:" in expected else 0)


def test_json_report_shape() -> None:
    res = runner.invoke(app, ["validate", "--json", str(CORPUS / "46-etcd-bad-values.yaml")])
    assert res.exit_code == 1
    entries = json.loads(res.stdout)
    assert [set(e) for e in entries] == [{"line", "column", "level", "path", "message"}] * len(entries)
    first = entries[0]
    assert (first["line"], first["column"], first["level"], first["path"]) == (4, 12, "error", "coreos.etcd2.proxy")
    assert [e["line"] for e in entries] == [4, 5, 6, 7, 8, 9]


def test_json_warnings_only_exit_zero() -> None:
    res = runner.invoke(app, ["validate", "--json", str(CORPUS / "33-unknown-keys.yaml")])
    assert res.exit_code == 0
    assert {e["level"] for e in json.loads(res.stdout)} == {"warning"}


def test_several_files_are_prefixed() -> None:
    a, b = CORPUS / "01-hostname-keys.yaml", CORPUS / "36-bad-reboot-strategy.yaml"
    res = runner.invoke(app, ["validate", str(a), str(b)])
    assert res.exit_code == 1
    assert res.stdout.splitlines() == [f"{b}: line 4: error: invalid value 'whenever': use one of off, reboot, "
                                       "etcd-lock, fleetlock, best-effort"]


def test_missing_file_is_one_clean_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: no such user-data file: check the path"


def test_gzip_userdata_is_unpacked() -> None:
    raw = gzip.compress((CORPUS / "36-bad-reboot-strategy.yaml").read_bytes())
    rep = validate_bytes(raw)
    assert [e.text() for e in rep.entries][0].startswith("line 4: error: invalid value 'whenever'")


def test_not_utf8_names_the_line() -> None:
    rep = validate_bytes(b"#cloud-config\nhostname: a\nwrite_files: \xff\xfe\n")
    assert [e.text() for e in rep.entries] == [
        "line 3: error: user-data is not UTF-8 text (byte 0xff); save the file as UTF-8"]


def test_broken_gzip() -> None:
    rep = validate_bytes(b"\x1f\x8b\x08\x00garbage")
    assert rep.errors and "does not decompress" in rep.errors[0].message


def test_dashes_and_underscores_are_the_same_key() -> None:
    a = validate_bytes(b"#cloud-config\ncoreos:\n  update:\n    reboot-strategy: 'off'\n")
    b = validate_bytes(b"#cloud-config\ncoreos:\n  update:\n    reboot_strategy: 'off'\n")
    assert a.value == b.value == {"coreos": {"update": {"reboot_strategy": "off"}}}


def test_unquoted_octal_permissions_keep_their_digits() -> None:
    rep = validate_bytes(b"#cloud-config\nwrite_files:\n  - path: /etc/a\n    permissions: 0600\n")
    assert rep.ok and rep.value["write_files"][0]["permissions"] == "0600"


def test_header_with_trailing_space_and_crlf() -> None:
    assert validate_bytes(b"#cloud-config   \r\nhostname: a\r\n").ok
    assert validate_bytes(b"\xef\xbb\xbf#cloud-config\nhostname: a\n").ok


def test_newline_in_a_one_line_setting_is_refused() -> None:
    rep = validate_bytes(b'#cloud-config\ncoreos:\n  etcd2:\n    name: "a\\nETCD_FORCE_NEW_CLUSTER=true"\n')
    assert [e.text() for e in rep.entries] == ['line 4: error: "name" must be a single line']


def test_through_the_installed_cli(obelisk_bin: str, tmp_path: Path) -> None:
    import subprocess

    bad = CORPUS / "43-etcd-not-in-cluster.yaml"
    res = subprocess.run([obelisk_bin, "cloudconfig", "validate", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and res.stdout == bad.with_suffix(".expected").read_text()
    res = subprocess.run([obelisk_bin, "cloudconfig", "validate", str(tmp_path / "x")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and res.stderr == f"error: {tmp_path / 'x'}: no such user-data file: check the path\n"
