"""What a payload must match, decided from the signed manifest before any write; trusted keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ue_helpers import APPID, World

from obelisk.inputs import InputFileError
from obelisk.signing import SigningError, load_public_key
from update_engine import omaha, payload
from update_engine.errors import ApplyError
from update_engine.policy import Policy, check_policy, load_keys


def _m(world: World, **over) -> payload.Manifest:
    m = world.build("1.1.0", seed=2).manifest
    from dataclasses import replace
    return replace(m, **over)


@pytest.mark.parametrize("policy, slot_len, code, words", [
    (Policy(app_id="{other}"), 1 << 30, omaha.ERR_PAYLOAD_VERIFICATION, "this host runs {other}"),
    (Policy(arch="arm64"), 1 << 30, omaha.ERR_PAYLOAD_VERIFICATION, "arch"),
    (Policy(current_version="1.1.0"), 1 << 30, omaha.ERR_PAYLOAD_VERIFICATION, "not newer"),
    (Policy(current_version="1.2"), 1 << 30, omaha.ERR_PAYLOAD_VERIFICATION, "downgrade"),
    (Policy(expected_version="1.1.1"), 1 << 30, omaha.ERR_PAYLOAD_VERIFICATION, "announced"),
    (Policy(expected_size=5), 1 << 30, omaha.ERR_PAYLOAD_SIZE, "announced 5"),
    (Policy(), 4096, omaha.ERR_PAYLOAD_SIZE, "holds only 4096"),
])
def test_refusals_carry_their_code(world: World, policy: Policy, slot_len: int, code: int, words: str) -> None:
    with pytest.raises(ApplyError) as ei:
        check_policy(world.build("1.1.0", seed=2).manifest, policy, slot_len)
    assert ei.value.code == code and words in str(ei.value), str(ei.value)


def test_accepted_and_downgrade_allowed(world: World) -> None:
    m = world.build("1.1.0", seed=2).manifest
    check_policy(m, Policy(app_id=APPID.upper(), arch="amd64", current_version="1.0.0",
                           expected_size=m.payload_size, expected_version="1.1"), 1 << 30)
    check_policy(m, Policy(current_version="2.0", allow_downgrade=True), 1 << 30)


def test_delta_operations_refused(world: World) -> None:
    m = world.build("1.1.0", seed=2).manifest
    op = payload.Operation(payload.OP_SOURCE_COPY, payload.Extent(0, 1), src=(payload.Extent(0, 1),))
    with pytest.raises(ApplyError, match="cannot apply yet"):
        check_policy(_m(world, operations=(*m.operations, op)), Policy(), 1 << 30)


@pytest.mark.timeout(30)
def test_keys_are_regular_files(world: World, tmp_path: Path) -> None:
    d = tmp_path / "keys"
    d.mkdir()
    (d / "b.pub").write_bytes(world.pub.read_bytes())
    (d / "a.pub").write_bytes(world.evil_pub.read_bytes())
    keys = load_keys(d)
    assert [k.key_id for k in keys] == [load_public_key(world.evil_pub).key_id, load_public_key(world.pub).key_id]
    assert load_keys(tmp_path / "none") == []
    os.mkfifo(d / "c.pub")
    with pytest.raises(InputFileError, match="FIFO"):
        load_keys(d)
    (d / "c.pub").unlink()
    (d / "c.pub").write_text("not a key")
    with pytest.raises(SigningError):
        load_keys(d)
