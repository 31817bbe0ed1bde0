"""Maintenance windows, lock.conf, the host id and strategy selection (no etcd needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obelisk.lock_conf import LockConfig, LockConfigError
from obelisk.windows import Window, WindowError, WindowSet, parse_duration
from update_engine.reboot import StrategyError, coordinator_from_config
from update_engine.reboot.identity import ZINCATI_APP_ID, IdentityError, app_specific_id, host_id

BAD_WINDOWS = [
    "", "Mon", "02:00", "Mon 02:00", "Mon..Fri 2am 1h", "Mon..Fri 24:00 1h", "Mon..Fri 02:60 1h",
    "Mon..Fry 02:00 1h", "Funday 02:00 1h", "Mon.Fri 02:00 1h", "Mon..Fri 02:00 0m", "Mon..Fri 02:00 -1h",
    "Mon..Fri 02:00 8d", "Mon..Fri 02:00 1x", "Mon..Fri 02:00 h", "Mon..Fri 02:00 1h 5m", "Mon..Fri 02:00 1h30",
    "Mo 02:00 1h", "Mon,,Tue 02:00 1h", "Mon.. 02:00 1h", "..Fri 02:00 1h", "Mon 2:0 1h", "Mon 02:00 1h;;x",
]


@pytest.mark.parametrize("text", BAD_WINDOWS)
def test_malformed_windows_are_refused_with_a_clear_message(text: str) -> None:
    with pytest.raises(WindowError) as exc:
        WindowSet.parse(text if text else "x")
    msg = str(exc.value)
    assert "expected" in msg or "use" in msg or "must" in msg
    assert "\n" not in msg


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_string_is_a_window_or_a_window_error(text: str) -> None:
    try:
        ws = WindowSet.parse(text)
    except WindowError:
        return
    # Whatever parses renders to something that parses to the same windows.
    assert WindowSet.parse(ws.render()).windows == ws.windows


@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True),
    st.integers(0, 23), st.integers(0, 59), st.integers(1, 7 * 24 * 60),
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)),
    st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]),
)
@settings(max_examples=200, deadline=None)
def test_next_open_is_open_and_nothing_earlier_is(days, hour, minute, minutes, when, tz) -> None:
    w = Window(tuple(sorted(days)), datetime(2000, 1, 1, hour, minute).time(), timedelta(minutes=minutes))
    ws = WindowSet((w,), ZoneInfo(tz) if tz != "UTC" else UTC)
    now = when.replace(tzinfo=UTC)
    nxt = ws.next_open(now)
    assert nxt >= now
    assert ws.is_open(nxt)
    assert nxt - now <= timedelta(days=7)
    if nxt > now:
        assert not ws.is_open(nxt - timedelta(seconds=1))


def test_window_semantics_with_timezone_and_wrap() -> None:
    ws = WindowSet.parse("Mon..Fri 02:00 1h30m", "Europe/Berlin")
    # 2026-11-23 is a Monday; Berlin is UTC+1 in November.
    assert ws.is_open(datetime(2026, 11, 23, 1, 0, tzinfo=UTC))  # 02:00 Berlin
    assert ws.is_open(datetime(2026, 11, 23, 2, 29, tzinfo=UTC))
    assert not ws.is_open(datetime(2026, 11, 23, 2, 30, tzinfo=UTC))
    assert not ws.is_open(datetime(2026, 11, 28, 1, 30, tzinfo=UTC))  # Saturday
    assert ws.next_open(datetime(2026, 11, 28, 1, 30, tzinfo=UTC)) == datetime(2026, 11, 30, 1, 0, tzinfo=UTC)
    wrap = WindowSet.parse("Sun 23:00 2h; Fri..Mon 12:00 10m")
    assert wrap.is_open(datetime(2026, 11, 30, 0, 30, tzinfo=UTC))  # Monday 00:30, from Sunday's window
    assert wrap.is_open(datetime(2026, 11, 29, 12, 5, tzinfo=UTC))  # Sunday in Fri..Mon
    assert not wrap.is_open(datetime(2026, 11, 25, 12, 5, tzinfo=UTC))  # Wednesday
    assert WindowSet.parse(None).is_open()
    assert parse_duration("1h30m") == timedelta(minutes=90)


def test_lock_conf_round_trip_and_errors_name_the_key() -> None:
    text = (
        "# fleet\nENDPOINT=https://10.0.0.1:2379,https://10.0.0.2:2379\nGROUP=workers\n"
        "CAFILE=/etc/ssl/etcd/ca.pem\nCERTFILE=/etc/ssl/etcd/c.pem\nKEYFILE=/etc/ssl/etcd/c.key\n"
        'WINDOW="Mon..Fri 02:00 1h30m; Sat 04:00 4h"\nTIMEZONE=Europe/Berlin\nSTALE_AFTER=2h\n'
        "WINDOW_START=Thu 04:00\nWINDOW_LENGTH=1h\nCOURTESY_DELAY=1m\n"
    )
    conf = LockConfig.parse(text)
    assert conf.endpoint == ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
    assert conf.stale_after == timedelta(hours=2)
    assert len(conf.windows().windows) == 3
    assert LockConfig.parse(conf.render()) == conf
    assert LockConfig().render() == ""
    bad = {
        "ENDPOINT=10.0.0.1:2379": "ENDPOINT",
        "GROUP=a/b": "GROUP",
        "WINDOW=Mon..Fri 25:00 1h": "WINDOW",
        "TIMEZONE=Nowhere/Town": "TIMEZONE",
        "STALE_AFTER=soon": "STALE_AFTER",
        "WINDOW_START=Thu 04:00": "WINDOW_LENGTH",
        "CERTFILE=/x": "KEYFILE",
        "NOPE=1": "NOPE",
        "ENDPOINT": "KEY=VALUE",
    }
    for line, key in bad.items():
        with pytest.raises(LockConfigError) as exc:
            LockConfig.parse("# c\n" + line + "\n")
        assert key in str(exc.value), (line, str(exc.value))


def test_host_id_is_app_specific_and_never_the_machine_id(tmp_path) -> None:
    mid = "4a1d0a3b7c9e4f2a8b6c5d4e3f2a1b0c"
    path = tmp_path / "machine-id"
    path.write_text(mid + "\n")
    hid = host_id(path)
    assert hid == app_specific_id(mid) and len(hid) == 32 and hid != mid
    assert hid[12] == "4" and hid[16] in "89ab"  # UUIDv4 shape, as sd_id128_get_machine_app_specific
    assert app_specific_id(mid, ZINCATI_APP_ID) != hid
    # Zincati/systemd construction: HMAC-SHA256(key=machine id bytes, msg=app id bytes), v4 bits.
    import hashlib
    import hmac

    raw = bytearray(hmac.new(bytes.fromhex(mid), ZINCATI_APP_ID, hashlib.sha256).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    assert app_specific_id(mid, ZINCATI_APP_ID) == raw.hex()
    path.write_text("not-an-id\n")
    with pytest.raises(IdentityError, match="32 hex"):
        host_id(path)
    with pytest.raises(IdentityError, match="cannot read"):
        host_id(tmp_path / "missing")


def test_strategy_selection_and_bad_strategies() -> None:
    conf = LockConfig.parse("WINDOW=Sat 04:00 1h\n")
    assert coordinator_from_config({"REBOOT_STRATEGY": "off"}, conf).strategy == "off"
    assert coordinator_from_config("reboot", conf).strategy == "reboot"
    assert coordinator_from_config("best-effort", conf).strategy == "reboot"  # no ENDPOINT
    c = coordinator_from_config("best-effort", LockConfig(endpoint=["http://127.0.0.1:1"]), host_id="h1")
    assert c.strategy == "etcd-lock" and c.holder == "h1"

    class UpdateConf:  # the shape of obelisk.update_conf's model: an attribute reboot_strategy
        reboot_strategy = "fleetlock"

    c = coordinator_from_config(UpdateConf(), LockConfig(fleetlock_url="http://127.0.0.1:1"), host_id="h2")
    assert c.strategy == "fleetlock"
    for strategy, msg in [("etcd_lock", "unknown"), ("sometimes", "unknown"), ("", "unknown")]:
        with pytest.raises(StrategyError, match=msg):
            coordinator_from_config({"REBOOT_STRATEGY": strategy or " "}, conf)
    with pytest.raises(StrategyError, match="ENDPOINT"):
        coordinator_from_config("etcd-lock", conf, host_id="h")
    with pytest.raises(StrategyError, match="FLEETLOCK_URL"):
        coordinator_from_config("fleetlock", conf, host_id="h")
    # off never reboots, whatever else is configured
    assert coordinator_from_config("off", conf).wait_and_reboot(lambda: pytest.fail("rebooted"), lambda: False) is False
