"""The etcd semaphore against a real single-member etcd: layout, CAS, re-entrancy, stale holders,
corrupt values, unreachable etcd, and the `obelisk lock` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import etcd3gw
import pytest
from typer.testing import CliRunner

from update_engine.reboot.cli import app
from update_engine.reboot.semaphore import (
    CorruptSemaphore,
    EtcdEndpoints,
    EtcdSemaphore,
    EtcdUnavailable,
    SlotsFull,
    sem_key,
    taken_key,
)

pytestmark = pytest.mark.etcd
runner = CliRunner()


def raw_client(etcd) -> etcd3gw.Etcd3Client:
    return etcd3gw.client(host="127.0.0.1", port=etcd.members[0].client_port)


def test_airlock_layout_cas_and_reentrancy(etcd1, group) -> None:
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    assert not sem.read().exists
    assert sem.set_max(2) == (0, 2)
    sem.lock("b")
    sem.lock("a")
    sem.lock("a")  # re-entrant: no error, no second slot
    raw = raw_client(etcd1).get(f"com.coreos.airlock/groups/{group}/v1/semaphore")
    assert raw == [b'{"total_slots":2,"holders":["a","b"]}']  # byte for byte what Airlock writes
    with pytest.raises(SlotsFull, match="all 2 slot"):
        sem.lock("c")
    assert sem.unlock("a") is True
    assert sem.unlock("a") is False
    state = sem.lock("c")
    assert state.holders == ["b", "c"] and set(state.taken) == {"b", "c"}
    taken = json.loads(raw_client(etcd1).get(taken_key(group))[0])
    assert set(taken["taken"]) == {"b", "c"}


def test_airlock_written_values_are_read_and_kept(etcd1, group) -> None:
    """A semaphore written by Airlock (null holders, no take times) is shared, and our writes keep
    Airlock's layout; a holder Airlock added gets a take time when obelisk first sees it."""
    c = raw_client(etcd1)
    c.put(sem_key(group), '{"total_slots":1,"holders":null}')
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group, stale_after=timedelta(hours=1))
    sem.lock("obelisk-host")
    c.put(sem_key(group), '{"total_slots":2,"holders":["obelisk-host","zincati-host"]}')  # Airlock's write
    with pytest.raises(SlotsFull):
        sem.lock("third")
    state = sem.read()
    assert "zincati-host" in state.taken  # stamped, so it can go stale one day
    assert json.loads(c.get(sem_key(group))[0]) == {"total_slots": 2, "holders": ["obelisk-host", "zincati-host"]}


CORRUPT = [b"{bad", b"[]", b'"x"', b'{"holders":[]}', b'{"total_slots":-1,"holders":[]}',
           b'{"total_slots":"2","holders":[]}', b'{"total_slots":2,"holders":[1]}', b'{"total_slots":2,"holders":"a"}',
           b"\xff\xfe", b""]


@pytest.mark.parametrize("value", CORRUPT)
def test_corrupt_semaphore_is_refused_and_left_alone(etcd1, group, value) -> None:
    c = raw_client(etcd1)
    c.put(sem_key(group), value)
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    for op in (lambda: sem.lock("a"), lambda: sem.unlock("a"), lambda: sem.set_max(3), sem.read):
        with pytest.raises(CorruptSemaphore, match="refuses to overwrite"):
            op()
    assert c.get(sem_key(group)) == [value]
    result = runner.invoke(app, ["status", "--endpoint", etcd1.endpoints, "--group", group])
    assert result.exit_code == 2 and result.output.startswith("error: semaphore ") and "Traceback" not in result.output


def test_unreachable_etcd_is_one_clear_error() -> None:
    sem = EtcdSemaphore(EtcdEndpoints("http://127.0.0.1:9,http://127.0.0.1:11", timeout=1), "default")
    with pytest.raises(EtcdUnavailable, match="127.0.0.1:9: connection refused; http://127.0.0.1:11"):
        sem.lock("a")
    result = runner.invoke(app, ["lock", "--id", "a", "--endpoint", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and result.output.startswith("error: etcd unavailable")
    assert len(result.output.strip().splitlines()) == 1


def test_lock_cli_commands(etcd1, group, tmp_path) -> None:
    ep = ["--endpoint", etcd1.endpoints, "--group", group]
    r = runner.invoke(app, ["set-max", "2", *ep])
    assert r.exit_code == 0 and r.output == "Old: 0\nNew: 2\n"
    assert runner.invoke(app, ["lock", "--id", "h1", *ep]).exit_code == 0
    assert runner.invoke(app, ["lock", "--id", "h1", *ep]).exit_code == 0  # re-entrant
    assert runner.invoke(app, ["lock", "--id", "h2", *ep]).exit_code == 0
    r = runner.invoke(app, ["lock", "--id", "h3", *ep])
    assert r.exit_code == 2 and "error: all 2 slot(s)" in r.output
    r = runner.invoke(app, ["status", "--json", *ep])
    doc = json.loads(r.output)
    assert doc["total_slots"] == 2 and [h["id"] for h in doc["holders"]] == ["h1", "h2"]
    assert all(h["taken"] for h in doc["holders"])
    r = runner.invoke(app, ["status", *ep])
    assert r.exit_code == 0 and "0 of 2 slot(s) available" in r.output
    r = runner.invoke(app, ["unlock", "--id", "h1", *ep])
    assert r.exit_code == 0 and "unlocked" in r.output
    r = runner.invoke(app, ["unlock", "--id", "h1", *ep])
    assert r.exit_code == 0 and "nothing to do" in r.output
    # settings from a lock.conf file
    conf = tmp_path / "lock.conf"
    conf.write_text(f"ENDPOINT={etcd1.endpoints}\nGROUP={group}\n")
    r = runner.invoke(app, ["status", "--json", "--config", str(conf)])
    assert json.loads(r.output)["available"] == 1
    # bad input: one line, exit 2
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    for args, msg in [
        (["set-max", *ep, "--", "-1"], "0 or more"),
        (["status", "--endpoint", "localhost:2379"], "bad etcd URL"),
        (["status", "--endpoint", etcd1.endpoints, "--group", "a/b"], "bad group"),
        (["status", "--config", str(tmp_path / "none.conf")], "no such lock config"),
        (["status", "--config", str(fifo)], "not a lock config"),  # a FIFO would block the read
        (["lock", "--id", "x", "--endpoint", etcd1.endpoints, "--certfile", "/c"], "go together"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error: ") and msg in r.output, (args, r.output)
    conf.write_text("WINDOW=Mon 25:00 1h\n")
    r = runner.invoke(app, ["status", "--config", str(conf)])
    assert r.exit_code == 2 and "WINDOW" in r.output


HOLDER = """
import sys, time
from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore
EtcdSemaphore(EtcdEndpoints(sys.argv[1]), sys.argv[2]).lock("doomed")
print("locked", flush=True)
time.sleep(600)
"""


def test_holder_killed_after_taking_the_lock_is_reclaimed_after_stale_after_not_before(etcd1, group) -> None:
    stale_after = timedelta(seconds=2)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, etcd1.endpoints, group], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group, stale_after=stale_after)
    taken = sem.read().taken["doomed"]
    refusals = 0
    while True:
        before = datetime.now(UTC)
        try:
            state = sem.lock("survivor")
            break
        except SlotsFull:
            refusals += 1
            # a refusal is only right while the holder is younger than stale_after (the decision was
            # taken at or after `before`, so a refusal with before - taken >= stale_after is a bug)
            assert before - taken < stale_after
            time.sleep(0.2)
    assert refusals > 0  # it was not reclaimed at once
    assert state.holders == ["survivor"]
    rec = state.reclaims[-1]
    assert rec["id"] == "doomed" and rec["by"] == "survivor"
    reclaimed = datetime.fromisoformat(rec["reclaimed"].replace("Z", "+00:00"))
    assert reclaimed - taken >= stale_after  # not before stale_after
    out = runner.invoke(app, ["status", "--json", "--endpoint", etcd1.endpoints, "--group", group]).output
    assert json.loads(out)["reclaims"][-1]["id"] == "doomed"
