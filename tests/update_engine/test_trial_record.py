"""The record a failed trial leaves for the daemon (obelisk/trial_record.py): read back, bounded,
sanitised, matched to the version; a damaged or hostile file is never a crash and never more than a line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obelisk import trial_record
from update_engine import omaha


def test_the_record_is_read_and_matched_to_the_version(tmp_path: Path) -> None:
    (tmp_path / trial_record.NAME).write_text("time=17\nslot=A\nversion=1.2.0\nreason=system is degraded: "
                                              "failed units: etcd.service\n")
    rec = trial_record.read(tmp_path)
    assert rec == trial_record.TrialFailure(17.0, "A", "1.2.0", "system is degraded: failed units: etcd.service")
    assert trial_record.reason_for(tmp_path, "1.2.0") == ("trial of 1.2.0 on slot A failed: system is degraded: "
                                                           "failed units: etcd.service")
    assert trial_record.reason_for(tmp_path, "1.3.0") == trial_record.NO_RECORD  # an older trial's record
    assert trial_record.last(tmp_path) == (rec, False)
    trial_record.mark_sent(tmp_path)
    trial_record.mark_sent(tmp_path)  # twice is fine
    assert trial_record.reason_for(tmp_path, "1.2.0") == trial_record.NO_RECORD  # never sent twice
    assert trial_record.last(tmp_path) == (rec, True)
    assert trial_record.describe(rec) == ("slot A (1.2.0) fell back at 1970-01-01 00:00:17 UTC: system is degraded: "
                                          "failed units: etcd.service")


@pytest.mark.parametrize("content", [b"", b"garbage", b"reason=", b"\xff\xfe\x00reason", b"time=x\nreason=ok\n",
                                     b"reason=" + b"y" * 100_000])
def test_damaged_records_are_no_reason_or_a_bounded_one(tmp_path: Path, content: bytes) -> None:
    (tmp_path / trial_record.NAME).write_bytes(content)
    why = trial_record.reason_for(tmp_path, "1.0.0")
    assert "\n" not in why and len(why) <= trial_record.MAX_REASON + 80


def test_a_folder_in_its_place_is_no_record(tmp_path: Path) -> None:
    (tmp_path / trial_record.NAME).mkdir()
    assert trial_record.read(tmp_path) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000))
def test_any_reason_becomes_one_bounded_line_that_survives_omaha(text: str) -> None:
    clean = trial_record.sanitize(text)
    assert len(clean) <= trial_record.MAX_REASON and not any(ord(c) < 32 or ord(c) == 127 for c in clean)
    xml = omaha.build_request(omaha.Request(omaha.AppRequest("{app}", "1.0.0", "stable", events=[
        omaha.Event(3, 0, 44, reason=clean or None)])))
    back = omaha.parse_request(xml.encode() if isinstance(xml, str) else xml).app.events[0]
    assert (back.reason or "") == clean
