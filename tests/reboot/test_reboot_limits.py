"""Hostile and oversized input to the lock, against real etcd and the real FleetLock server:
deeply nested JSON (a semaphore value, the take-times value, a request body), a semaphore too big
for one etcd request, slot counts past what Airlock can hold, and lock ids Airlock could not share.
Each case gets one clear error (or is refused with a clear answer) and leaves etcd as it was."""

from __future__ import annotations

import json
import logging

import etcd3gw
import pytest
from etcdlib import LocalEtcd
from typer.testing import CliRunner

from update_engine.reboot.cli import app
from update_engine.reboot.errors import BadJson, BadLockId, BadSlotCount, CorruptSemaphore, SemaphoreTooBig
from update_engine.reboot.keys import sem_key, taken_key
from update_engine.reboot.limits import (
    ETCD_MAX_REQUEST_BYTES,
    MAX_ID_BYTES,
    MAX_JSON_DEPTH,
    MAX_SLOTS,
    check_holder_id,
    parse_json_bounded,
)
from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore

pytestmark = pytest.mark.etcd
runner = CliRunner()


def raw_client(etcd) -> etcd3gw.Etcd3Client:
    return etcd3gw.client(host="127.0.0.1", port=etcd.members[0].client_port)


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


# Deep enough to overflow the parser (RecursionError) or only our bound; as the whole value or inside.
DEEP_VALUES = [
    nested(100_000),
    '{"total_slots":1,"holders":[],"x":' + nested(100_000) + "}",
    '{"total_slots":1,"holders":[],"x":' + nested(MAX_JSON_DEPTH + 1) + "}",  # parses, but not written back
    '{"total_slots":1,"holders":' + nested(5000, '"a"') + "}",
    '{"total_slots":1,"holders":[],"x":' + "{\"a\":" * 50_000 + "1" + "}" * 50_000 + "}",
]


def test_parse_json_bounded_names_what_and_why() -> None:
    deepest = nested(MAX_JSON_DEPTH - 1)  # with the object around it: exactly the bound
    assert parse_json_bounded('{"a":' + deepest + "}", "x") == {"a": json.loads(deepest)}
    for raw in (nested(100_000), nested(MAX_JSON_DEPTH + 1)):
        with pytest.raises(BadJson, match=r"^request body is nested too deeply \(more than 32 levels\)$"):
            parse_json_bounded(raw, "request body")
    with pytest.raises(BadJson, match="request body is not valid JSON"):
        parse_json_bounded(b"\xff{", "request body")
    with pytest.raises(BadJson, match="request body is 20 bytes, more than the 10 allowed"):
        parse_json_bounded(b"[" * 20, "request body", max_bytes=10)
    assert isinstance(BadJson("x"), ValueError)  # callers that catch ValueError for bad JSON still do


@pytest.mark.parametrize("value", DEEP_VALUES, ids=["array", "field", "just-past-bound", "holders", "objects"])
def test_deeply_nested_semaphore_is_corrupt_not_a_traceback(etcd1, group, value) -> None:
    c = raw_client(etcd1)
    c.put(sem_key(group), value)
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    for op in (lambda: sem.lock("a"), lambda: sem.unlock("a"), lambda: sem.set_max(3), sem.read):
        with pytest.raises(CorruptSemaphore, match="nested too deeply.*refuses to overwrite"):
            op()
    assert c.get(sem_key(group)) == [value.encode()]
    r = runner.invoke(app, ["status", "--endpoint", etcd1.endpoints, "--group", group])
    assert r.exit_code == 2 and r.output.startswith("error: semaphore ") and "nested too deeply" in r.output
    assert len(r.output.splitlines()) == 1


def test_deeply_nested_take_times_are_ignored_and_rewritten(etcd1, group, caplog) -> None:
    """The obelisk-taken key is advisory: a broken one costs the take times, never the lock."""
    c = raw_client(etcd1)
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    sem.set_max(2)
    c.put(taken_key(group), '{"taken":' + nested(100_000) + "}")
    with caplog.at_level(logging.WARNING, "obelisk.reboot.lock"):
        state = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group).lock("a")
    assert state.holders == ["a"] and "ignoring unreadable" in caplog.text
    assert set(json.loads(c.get(taken_key(group))[0])["taken"]) == {"a"}


@pytest.mark.parametrize("total", ["18446744073709551616", "9223372036854775808", "1" + "0" * 4000,
                                   "1e400", "2.0", "-0.5"])
def test_total_slots_past_what_airlock_holds_is_corrupt(etcd1, group, total) -> None:
    c = raw_client(etcd1)
    value = f'{{"total_slots":{total},"holders":[]}}'
    c.put(sem_key(group), value)
    with pytest.raises(CorruptSemaphore, match="refuses to overwrite"):
        EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group).lock("a")
    assert c.get(sem_key(group)) == [value.encode()]


def test_set_max_bounds(etcd1, group) -> None:
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    assert sem.set_max(MAX_SLOTS) == (0, MAX_SLOTS)  # the largest Airlock can count: kept and read back
    assert sem.read().total_slots == MAX_SLOTS
    for bad in (MAX_SLOTS + 1, 2**64, 10**5000, -1, True):
        with pytest.raises(BadSlotCount, match="0 or more and at most 9223372036854775807"):
            sem.set_max(bad)
    assert sem.read().total_slots == MAX_SLOTS
    with pytest.raises(BadSlotCount):
        EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group, default_slots=2**64)
    ep = ["--endpoint", etcd1.endpoints, "--group", group]
    for arg in (str(2**64), str(MAX_SLOTS + 1)):
        r = runner.invoke(app, ["set-max", *ep, arg])
        assert r.exit_code == 2 and r.output.startswith("error: slot count must be") and len(r.output.splitlines()) == 1
    r = runner.invoke(app, ["set-max", *ep, "3"])
    assert r.exit_code == 0 and r.output == f"Old: {MAX_SLOTS}\nNew: 3\n"


BAD_IDS = ["x" * (MAX_ID_BYTES + 1), "é" * (MAX_ID_BYTES // 2 + 1), "a b", "a\nb", "a\tb", "\x00", "a\x1b[2Jb",
           "\u200bzero-width-space\u2028", "\ud800", ""]


def test_lock_ids_are_bounded(etcd1, group) -> None:
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    sem.set_max(100)
    before = raw_client(etcd1).get(sem_key(group))
    for bad in BAD_IDS:
        with pytest.raises(BadLockId):
            sem.lock(bad)
    assert raw_client(etcd1).get(sem_key(group)) == before  # nothing written
    longest = "x" * MAX_ID_BYTES
    for ok in (longest, "host-1.example.com", "e0f3745b108f471cbd4883c6fbed8cdd", "ünïcode"):
        assert check_holder_id(ok) == ok
        sem.lock(ok)
    r = runner.invoke(app, ["lock", "--id", "y" * 1000, "--endpoint", etcd1.endpoints, "--group", group])
    assert r.exit_code == 2 and r.output == f"error: lock id is 1000 bytes long, more than the {MAX_ID_BYTES} allowed\n"


def test_an_odd_holder_written_by_someone_else_can_still_be_given_back(etcd1, group) -> None:
    """Airlock takes any string: obelisk refuses to lock with such an id, but an operator can unlock it."""
    odd = "z" * 1000
    raw_client(etcd1).put(sem_key(group), json.dumps({"total_slots": 1, "holders": [odd]}))
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    assert sem.unlock(odd) is True
    assert sem.read().holders == []


def _big_semaphore(count: int, id_len: int = 200) -> tuple[str, list[str]]:
    holders = sorted(f"{i:06d}" + "x" * (id_len - 6) for i in range(count))
    return json.dumps({"total_slots": count + 10, "holders": holders}, separators=(",", ":")), holders


@pytest.mark.timeout(120)
def test_semaphore_too_big_for_etcd_is_said_so_and_unlock_shrinks_it(etcd1, group) -> None:
    """A value Airlock (or etcdctl) grew to 1.2 MB: with take times the next write would pass etcd's
    1.5 MiB request limit, which etcd refuses and which used to read as "no quorum"."""
    value, holders = _big_semaphore(6000)
    assert len(value) < ETCD_MAX_REQUEST_BYTES
    c = raw_client(etcd1)
    c.put(sem_key(group), value)
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    with pytest.raises(SemaphoreTooBig, match=r"would exceed etcd's request size limit \(\d+ of 1572864 bytes\); "
                                              r"remove stale holders with 'obelisk lock unlock --group g\d+ --id ID'"):
        sem.lock("newcomer")
    r = runner.invoke(app, ["lock", "--id", "newcomer", "--endpoint", etcd1.endpoints, "--group", group])
    assert r.exit_code == 2 and "request size limit" in r.output and "unavailable" not in r.output
    assert len(r.output.splitlines()) == 1
    assert c.get(sem_key(group)) == [value.encode()]
    # The way out the message names works even now: take times are dropped to make it fit.
    r = runner.invoke(app, ["unlock", "--id", holders[0], "--endpoint", etcd1.endpoints, "--group", group])
    assert r.exit_code == 0, r.output
    assert sem.read().holders == holders[1:]


@pytest.mark.timeout(60)
def test_a_smaller_etcd_request_limit_is_reported_as_such(tmp_path) -> None:
    """A cluster run with --max-request-bytes below etcd's default: the client cannot know the limit,
    so etcd's refusal itself ("request is too large") is turned into the same error, not "no quorum"."""
    with LocalEtcd(tmp_path / "etcd", 1, max_request_bytes=8192) as etcd:
        sem = EtcdSemaphore(EtcdEndpoints(etcd.endpoints), "small")
        sem.set_max(1000)
        with pytest.raises(SemaphoreTooBig, match="too big for etcd's request size limit .*request is too large.*"
                                                  "obelisk lock unlock"):
            for i in range(200):
                sem.lock(f"h{i:03d}" + "x" * 60)
        assert 10 < i < 100
        assert len(sem.read().holders) == i
