"""The corpus: Ignition configs (every spec 3.0.0-3.4.0) and Butane configs (fcos 1.0.0-1.5.0, flatcar
1.0.0-1.1.0) written from the spec documents, valid and invalid, each with its exact report
(<config>.expected: a summary line, then one line per entry with line, column, JSON pointer)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_ignition_support import CORPUS, FILES, fresh_root

from cloudconfig import ignition
from cloudconfig.ignition.butane import VARIANTS
from cloudconfig.ignition.spec import SPECS

pytestmark = pytest.mark.timeout(60)

CONFIGS = sorted(p for p in CORPUS.iterdir() if p.suffix in (".ign", ".bu"))


def render(rep: ignition.IgnitionReport) -> str:
    head = f"kind: {rep.kind}"
    if rep.variant:
        head += f"  variant: {rep.variant}"
    head += f"  version: {rep.version}  spec: {rep.spec}  ok: {str(rep.ok).lower()}"
    return "\n".join([head, *(e.text() for e in rep.entries)]) + "\n"


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_report_is_exactly_the_expected_one(config: Path) -> None:
    rep = ignition.validate(config.read_bytes(), files_dir=FILES)
    assert render(rep) == config.with_name(config.name + ".expected").read_text()


def test_every_accepted_version_has_a_valid_config() -> None:
    valid: set[tuple[str, str]] = set()
    for p in CONFIGS:
        head = p.with_name(p.name + ".expected").read_text().splitlines()[0]
        if head.endswith("ok: true"):
            m = re.search(r"(?:variant: (\S+)  )?version: (\S+)", head)
            assert m
            valid.add((m.group(1) or "ignition", m.group(2)))
    wanted = {("ignition", v) for v in SPECS} | {(var, v) for var, vs in VARIANTS.items() for v in vs}
    assert wanted <= valid, wanted - valid


def test_every_section_is_in_the_corpus() -> None:
    text = "".join(p.read_text() for p in CONFIGS)
    for key in ("files", "directories", "links", "hard", "append", "compression", "verification", "httpHeaders",
                "overwrite", "units", "dropins", "enabled", "mask", "users", "groups", "passwordHash",
                "sshAuthorizedKeys", "uid", "gecos", "homeDir", "noCreateHome", "primaryGroup", "shell", "system",
                "merge", "replace", "certificateAuthorities", "proxy", "timeouts", "kernelArguments", "disks",
                "raid", "filesystems", "luks", "shouldExist", "trees", "local", "inline", "contents_local",
                "ssh_authorized_keys_local", "boot_device", "grub"):
        assert f'"{key}"' in text or f"{key}:" in text, key


def test_json_report_shape() -> None:
    rep = ignition.validate((CORPUS / "31-modes.ign").read_bytes())
    doc = rep.to_json()
    assert {k: doc[k] for k in ("kind", "version", "spec", "ok", "errors", "warnings")} == {
        "kind": "ignition", "version": "3.4.0", "spec": "3.4.0", "ok": False, "errors": 2, "warnings": 4}
    assert doc["entries"][0] == {"line": 9, "column": 17, "level": "error", "path": "/storage/files/0/mode",
                                 "message": "illegal file mode 4096 (modes are decimal in JSON: 0644 is 420, "
                                            "0755 is 493)"}
    assert rep.as_json() == doc["entries"]  # the list cloud-config's --json prints
    json.dumps(doc)


VALID_LOCAL = [p for p in CONFIGS if p.with_name(p.name + ".expected").read_text().split("\n")[0].endswith("true")
               and "http://" not in p.read_text() and "https://" not in p.read_text()]


@pytest.mark.parametrize("config", VALID_LOCAL, ids=[p.name for p in VALID_LOCAL])
def test_valid_configs_apply(tmp_path: Path, config: Path) -> None:
    root = fresh_root(tmp_path)
    res = ignition.apply(config.read_bytes(), root, files_dir=FILES)
    assert res.changed and ignition.provisioned_by_ignition(root)
    assert all(c.path.startswith("/") and ".." not in c.path for c in res.changes)
