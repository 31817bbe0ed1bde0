"""The ignition VM scenario's parts without a VM: its configs are what the scenario says they are (the good
one valid with no warnings, the broken one refused for exactly its relative path), and its config drive is
one cloud-config's datasource reads (mtools on the FAT image, as on the host)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.imagetest import ignition as scenario
from cloudconfig import datasources, ignition


@pytest.mark.timeout(60)
def test_the_good_config_is_valid_ignition_without_warnings() -> None:
    raw = json.dumps(scenario.good_config("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1 test")).encode()
    assert ignition.detect(raw) == "ignition"
    rep = ignition.validate(raw)
    assert rep.ok and not rep.entries, [vars(e) for e in rep.entries]


@pytest.mark.timeout(60)
def test_the_broken_config_is_refused_for_its_path_alone() -> None:
    raw = json.dumps(scenario.broken_config()).encode()
    assert ignition.detect(raw) == "ignition"
    rep = ignition.validate(raw)
    assert not rep.ok
    assert [(e.level, e.path) for e in rep.entries] == [("error", "/storage/files/0/path")]


@pytest.mark.timeout(60)
def test_the_config_drive_is_read_by_the_datasource(tmp_path: Path) -> None:
    text = json.dumps(scenario.broken_config())
    img = scenario.config_drive(tmp_path / "cd.img", text)
    by_label = tmp_path / "by-label"
    by_label.mkdir()
    (by_label / "config-2").symlink_to(img)
    got = datasources.from_configdrive(datasources.Settings(configdrive_dirs=(), by_label=by_label))
    assert got is not None and got.userdata.decode() == text
