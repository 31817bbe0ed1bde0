"""Waiting for a slot on an etcd watch (update_engine/reboot/watch.py) against real etcd: a waiter
wakes when a slot is given back, waiters go in queue order, the winner leaves the queue in its
CAS, and a lost or deaf watch falls back to polling so no host hangs."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from update_engine.reboot import RebootCoordinator
from update_engine.reboot.keys import waiting_key
from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore, SlotsFull
from update_engine.reboot.watch import GroupWatch

pytestmark = pytest.mark.etcd
LONG = 60.0  # a wait that ends by timeout instead of by the event would fail the test, not slow it


def sem_for(etcd1, group, slots=1) -> EtcdSemaphore:
    sem = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    sem.set_max(slots)
    return sem


def in_background(fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def until(cond, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.01)


def queued(sem: EtcdSemaphore, holder: str) -> bool:
    return bool(sem.etcd.call(lambda c: c.get(waiting_key(sem.group, holder))))


def drop_stream(hub: GroupWatch) -> None:
    """Cut the watch's TCP connection under it, as a dying member or a network blip would."""
    sock = socket.fromfd(hub._response.raw._fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_waiter_wakes_on_release_and_leaves_the_queue_in_its_cas(etcd1, group) -> None:
    a, b = sem_for(etcd1, group), EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    a.lock("host-a")
    with pytest.raises(SlotsFull):
        b.lock("host-b")
    t, out = in_background(lambda: b.wait_turn("host-b", LONG, lambda: False))
    until(lambda: queued(b, "host-b"), "host-b joins the queue")
    assert t.is_alive()  # no slot: still waiting
    a.unlock("host-a")
    t.join(LONG)
    assert out == ["turn"]
    state = b.lock("host-b")
    assert state.holders == ["host-b"]
    assert not queued(b, "host-b")  # deleted by the winning CAS itself
    b.stop_waiting("host-b", won=True)


def test_waiters_go_in_queue_order(etcd1, group) -> None:
    a = sem_for(etcd1, group)
    a.lock("host-a")
    b, c = (EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group) for _ in range(2))
    tb, out_b = in_background(lambda: b.wait_turn("host-b", LONG, lambda: False))
    until(lambda: queued(b, "host-b"), "host-b joins the queue")
    tc, out_c = in_background(lambda: c.wait_turn("host-c", LONG, lambda: False))
    until(lambda: queued(c, "host-c"), "host-c joins the queue")
    a.unlock("host-a")
    tb.join(LONG)
    assert out_b == ["turn"]
    assert tc.is_alive() and not c._watchers["host-c"].my_turn()  # one free slot, host-b is ahead
    b.lock("host-b")
    b.stop_waiting("host-b", won=True)
    b.unlock("host-b")
    tc.join(LONG)
    assert out_c == ["turn"]
    c.stop_waiting("host-c")
    assert not queued(c, "host-c")  # leaving revokes the lease, and the key goes with it


def test_stopping_a_waiter_leaves_the_queue(etcd1, group) -> None:
    a = sem_for(etcd1, group)
    a.lock("host-a")
    b = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    stop = threading.Event()
    coord = RebootCoordinator("etcd-lock", "host-b", lock=b, courtesy_delay=0, retry_min=0.05, poll=0.05)
    t, out = in_background(lambda: coord.wait_and_reboot(lambda: pytest.fail("rebooted without the slot"), stop.is_set))
    until(lambda: queued(b, "host-b"), "host-b joins the queue")
    stop.set()
    t.join(LONG)
    assert out == [False] and coord.state == "stopped"
    assert not queued(b, "host-b")
    assert a.read().holders == ["host-a"]


def test_lost_watch_falls_back_to_polling(etcd1, group) -> None:
    a = sem_for(etcd1, group)
    a.lock("host-a")
    b = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    seen: list[str] = []
    wait_turn = b.wait_turn

    def recording(*args, **kw) -> str:
        seen.append(wait_turn(*args, **kw))
        return seen[-1]

    b.wait_turn = recording  # type: ignore[method-assign]
    rebooted = threading.Event()
    coord = RebootCoordinator("etcd-lock", "host-b", lock=b, courtesy_delay=0, retry_min=0.05, retry_max=0.2,
                              poll=0.05, watch_fallback=LONG)
    t, out = in_background(lambda: coord.wait_and_reboot(rebooted.set, lambda: False))
    until(lambda: queued(b, "host-b") and "host-b" in b._watchers and b._watchers["host-b"].alive,
          "host-b watches")
    drop_stream(b._watchers["host-b"].hub)
    until(lambda: "lost" in seen, "the waiter notices its watch is gone")
    a.unlock("host-a")
    t.join(LONG)
    assert out == [True] and rebooted.is_set()
    assert b.read().holders == ["host-b"]


def test_deaf_watch_is_bounded_by_the_fallback_poll(etcd1, group, monkeypatch) -> None:
    """A stream that stays open but never delivers the release (a fake: events are dropped on
    purpose, which a real etcd does not do) must still not hang the host: watch_fallback bounds
    each wait, and the re-read finds the free slot."""
    a = sem_for(etcd1, group)
    a.lock("host-a")
    b = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group)
    monkeypatch.setattr(GroupWatch, "_apply", lambda self, kv, delete: None)
    rebooted = threading.Event()
    coord = RebootCoordinator("etcd-lock", "host-b", lock=b, courtesy_delay=0, retry_min=0.05, poll=0.05,
                              watch_fallback=1.0)
    t, out = in_background(lambda: coord.wait_and_reboot(rebooted.set, lambda: False))
    until(lambda: queued(b, "host-b"), "host-b joins the queue")
    a.unlock("host-a")
    t.join(LONG)
    assert out == [True] and rebooted.is_set()


def test_a_newcomer_queues_behind_waiting_hosts_instead_of_racing_them(etcd1, group) -> None:
    a = sem_for(etcd1, group)
    a.lock("host-a")
    b = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group, queue=True)
    tb, out_b = in_background(lambda: b.wait_turn("host-b", LONG, lambda: False))
    until(lambda: queued(b, "host-b"), "host-b joins the queue")
    a.unlock("host-a")
    tb.join(LONG)
    assert out_b == ["turn"]
    newcomer = EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group, queue=True)
    with pytest.raises(SlotsFull, match="1 free slot.* 1 host.* queued"):
        newcomer.lock("host-new")  # the free slot is host-b's turn
    assert newcomer.read().to_json(a.clock(), None)["queued"] == 1
    # The FleetLock server and the CLI (queue=False) are not in the queue and do not defer to it.
    assert EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group).lock("zincati-host").holders == ["zincati-host"]
    b.stop_waiting("host-b")
