"""Waiting for a reboot slot without polling: a watch on the group's keys and a queue of waiters.

A host that finds every slot taken registers a waiting key, `.../v1/obelisk-waiting/<id>`, bound to
its process's lease (so a waiter that dies drops out of the queue after LEASE_TTL), reads the group's keys
once, then follows them through one etcd watch stream. Waiters are ordered by their key's
create_revision; a waiter tries the CAS only when the free slots outnumber the waiters ahead of it,
so a release wakes the next host in line instead of every host at once (a herd of CAS txns on the
one semaphore key would make releases lose their CAS races and stall the fleet). The queue is
advisory: the semaphore's CAS alone keeps the safety, and Airlock/Zincati hosts, which know
nothing of it, still compete as before. The winner's CAS deletes its waiting key in the same txn.

One process follows a group through one stream (GroupWatch), however many waiters it has: a real
host has one, a FleetLock server or the fleet simulation many, and 200 threads each parsing every
event of their own stream spent more CPU than the locking itself. The stream only tells; every
waiter still has its own waiting key and CAS, so what etcd sees of each host is unchanged (the
lease, "this process is alive", is one per process: one keepalive serves all its waiters).
On each event the GroupWatch works out whose turn it is once and wakes exactly those waiters.

The stream is read here, not through etcd3gw's Watcher: that one gives no sign when its stream
dies (a member killed, a compaction), and a dead watch must be told apart from a quiet one so the
caller falls back to polling (see RebootCoordinator.watch_fallback) and the next wait opens a new
watch. It still goes through etcd3gw's client (its session, TLS settings and URL building).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import socket
import threading
import time
from collections.abc import Callable

from .endpoints import EtcdEndpoints
from .errors import LockError
from .keys import b64, group_prefix, prefix_end, sem_key, taken_key, waiting_key, waiting_prefix
from .state import SemaphoreState, load_taken, parse_semaphore

log = logging.getLogger("obelisk.reboot.watch")

LEASE_TTL = 30  # seconds a dead process's waiting keys stay in the queue


_hubs: dict[tuple, GroupWatch] = {}
_hubs_lock = threading.Lock()


class GroupWatch:
    """One watch stream over a group's keys: a mirror of the semaphore and the waiting queue, and
    the local waiters to wake when their turn comes."""

    def __init__(self, endpoints: EtcdEndpoints, group: str) -> None:
        self.etcd = endpoints
        self.group = group
        self.prefix = group_prefix(group)
        self.skey = sem_key(group)
        self.waiting_prefix = waiting_prefix(group)
        self.lock = threading.Lock()
        self.sem: SemaphoreState | None = None
        self.tkey = taken_key(group)
        self.taken_raw: bytes | None = None  # the obelisk-taken value, for state()
        self.waiting: dict[str, int] = {}  # waiting key -> create_revision (queue order)
        self.local: dict[str, threading.Event] = {}  # waiting key of a waiter in this process -> its bell
        self.alive = False
        self.events = 0  # watch events seen (tests, bench)
        self._response = None
        self._closed = False
        # One lease per process and group for all its waiting keys: it stands for "this process
        # is alive", which is what the queue needs to know; one keepalive serves every waiter.
        self.lease_ttl = LEASE_TTL
        self.lease_id: int | None = None
        self.lease_generation = 0  # bumped when the lease is granted anew: waiters put their keys again
        self._lease_lock = threading.Lock()
        self._refreshed = 0.0

    def lease(self) -> tuple[int, int]:
        """The process's lease for waiting keys, granted on first use: (id, generation)."""
        with self._lease_lock:
            if self.lease_id is None:
                self.lease_id = self.etcd.call(lambda c: c.lease(self.lease_ttl).id)
                self.lease_generation += 1
                self._refreshed = time.monotonic()
            return self.lease_id, self.lease_generation

    def keepalive(self) -> None:
        """Refresh the lease every third of its TTL (whoever asks first); a lapsed one is dropped so
        the next lease() grants a new one and the waiters re-put their keys."""
        with self._lease_lock:
            if self.lease_id is None or time.monotonic() - self._refreshed < self.lease_ttl / 3:
                return
            body = {"ID": self.lease_id}
            try:
                resp = self.etcd.call(lambda c: c.post(c.get_url("/lease/keepalive"), json=body))
            except LockError:
                return  # etcd trouble: the stream notices too; a lapsed lease costs only queue order
            self._refreshed = time.monotonic()
            if int((resp.get("result") or {}).get("TTL", 0) or 0) <= 0:
                self.lease_id = None

    @classmethod
    def get(cls, endpoints: EtcdEndpoints, group: str) -> GroupWatch:
        key = (tuple(endpoints.urls), endpoints.cafile, endpoints.certfile, endpoints.keyfile, group)
        with _hubs_lock:
            hub = _hubs.get(key)
            if hub is None or (not hub.alive and not hub.local) or hub._closed:
                hub = _hubs[key] = cls(endpoints, group)
            return hub

    def start(self) -> None:
        """Read the group's keys and open the stream after them. Raises LockError if etcd fails."""
        body = {"key": b64(self.prefix), "range_end": prefix_end(self.prefix)}
        resp = self.etcd.call(lambda c: c.post(c.get_url("/kv/range"), json=body))
        with self.lock:
            self.waiting.clear()
            for kv in resp.get("kvs") or []:
                self._apply(kv, delete=False)
        ready = threading.Event()
        threading.Thread(target=self._stream, args=(int(resp["header"]["revision"]) + 1, ready), daemon=True,
                         name=f"obelisk-watch-{self.group}").start()
        ready.wait(self.etcd.timeout)
        if not self.alive:
            raise LockError(f"could not open a watch on {self.prefix}")

    def _stream(self, start_revision: int, ready: threading.Event) -> None:
        body = {"create_request": {"key": b64(self.prefix), "range_end": prefix_end(self.prefix),
                                   "start_revision": str(start_revision)}}
        try:
            def open_stream(c):
                # No read timeout: a quiet group sends nothing for as long as the slots stay taken;
                # a stream that dies raises, and every waiter's own timeout bounds its wait anyway.
                return c.session.post(c.get_url("/watch"), json=body, stream=True, timeout=(self.etcd.timeout, None))

            self._response = resp = self.etcd.call(open_stream)
            if resp.status_code != 200:
                raise LockError(f"watch refused: HTTP {resp.status_code}")
            for line in resp.iter_lines(chunk_size=None):
                if not line.strip():
                    continue
                result = json.loads(line).get("result") or {}
                if result.get("created"):
                    self.alive = True
                    ready.set()
                if result.get("canceled") or result.get("compact_revision"):
                    raise LockError(f"watch canceled by etcd: {result.get('cancel_reason') or 'compacted'}")
                events = result.get("events") or []
                if events:
                    with self.lock:
                        for ev in events:
                            self.events += 1
                            self._apply(ev["kv"], delete=ev.get("type") == "DELETE")
                        self._ring()
        except Exception as exc:  # noqa: BLE001 - any end of the stream means "fall back to polling"
            if not self._closed:
                log.info("semaphore watch for %s ended (%s): falling back to polling", self.group, exc)
        finally:
            with self.lock:
                self.alive = False
                for bell in self.local.values():
                    bell.set()
            ready.set()

    def _apply(self, kv: dict, delete: bool) -> None:
        key = base64.b64decode(kv["key"]).decode(errors="replace")
        if key == self.skey:
            if delete:
                self.sem = None
                return
            try:
                self.sem = parse_semaphore(self.group, base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))
            except LockError:
                self.sem = None  # corrupt: nobody's turn; the fallback lock() call reports it
        elif key == self.tkey:
            self.taken_raw = None if delete else base64.b64decode(kv.get("value", ""))
        elif key.startswith(self.waiting_prefix):
            if delete:
                self.waiting.pop(key, None)
            else:
                self.waiting[key] = int(kv["create_revision"])

    def state(self) -> SemaphoreState | None:
        """The group's state as of the last event (a copy), so a woken waiter's CAS can start from
        it instead of from a read: one round trip for the hand-over, not two or three."""
        with self.lock:
            if self.sem is None:
                return None
            state = copy.deepcopy(self.sem)
            taken = self.taken_raw
        if taken is not None:
            load_taken(state, taken)
        return state

    def turn(self, wkey: str) -> bool:
        """Free slots outnumber the waiters queued ahead of `wkey` (call with self.lock held)."""
        if self.sem is None:
            return False
        mine = self.waiting.get(wkey)
        if mine is None:
            return False  # not queued (yet): its own put event will bring it in
        return self.sem.free > sum(1 for rev in self.waiting.values() if rev < mine)

    def _ring(self) -> None:
        """Wake the local waiters whose turn it is: the first `free` of the queue, once per event."""
        if self.sem is None or not self.local:
            return
        free = self.sem.free
        if free <= 0:
            return
        for wkey, _ in sorted(self.waiting.items(), key=lambda kv: kv[1])[:free]:
            bell = self.local.get(wkey)
            if bell is not None:
                bell.set()

    def join(self, wkey: str, bell: threading.Event) -> None:
        with self.lock:
            self.local[wkey] = bell

    def leave(self, wkey: str) -> None:
        with self.lock:
            self.local.pop(wkey, None)
            last = not self.local
        if last:
            self.close()

    def close(self) -> None:
        # The lease is not revoked: a waiter re-joining after a lost watch re-puts its key on the
        # next hub's lease while the old one still holds it, so it keeps its place in the queue.
        # Winners' keys went with their CAS and leavers delete theirs; the lease expires on its own.
        self._closed = True
        resp = self._response
        if resp is None:
            return
        try:
            # Same trick as etcd3gw's Watcher.stop: shutting the socket down is the one way to wake
            # a thread blocked reading a chunked response.
            sock = socket.fromfd(resp.raw._fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        except Exception:  # noqa: BLE001, S110 - already closed
            pass
        with contextlib.suppress(Exception):
            resp.close()


class TurnWatcher:
    """One waiting host: its place in the queue (a waiting key on its process's lease) and its bell
    on the group's GroupWatch."""

    def __init__(self, endpoints: EtcdEndpoints, group: str, holder: str) -> None:
        self.etcd = endpoints
        self.group = group
        self.holder = holder
        self.wkey = waiting_key(group, holder)
        self.bell = threading.Event()
        self.hub: GroupWatch | None = None
        self._generation = 0
        self._queued = False

    @property
    def alive(self) -> bool:
        return self.hub is not None and self.hub.alive and not self.hub._closed

    def start(self) -> TurnWatcher:
        """Join the queue and the group's watch. Raises LockError if etcd fails."""
        hub = GroupWatch.get(self.etcd, self.group)
        hub.join(self.wkey, self.bell)
        self.hub = hub
        try:
            self._register()
            with _hubs_lock:  # one thread opens the stream; the others find it open
                if not hub.alive:
                    hub.start()
        except LockError:
            self.close()
            raise
        return self

    def _register(self) -> None:
        assert self.hub is not None
        lease_id, self._generation = self.hub.lease()
        # A put on an existing key keeps its create_revision: a waiter that re-registers keeps its place.
        body = {"key": b64(self.wkey), "value": b64(str(time.time())), "lease": lease_id}
        self.etcd.call(lambda c: c.post(c.get_url("/kv/put"), json=body))
        self._queued = True

    def my_turn(self) -> bool:
        hub = self.hub
        if hub is None:
            return False
        with hub.lock:
            return hub.turn(self.wkey)

    def wait(self, timeout: float, should_stop: Callable[[], bool], step: float = 1.0) -> str:
        """Block until it is this host's turn ("turn"), the watch dies ("lost"), should_stop
        ("stopped") or timeout passes ("timeout"). Keeps the waiting key's lease alive."""
        deadline = time.monotonic() + timeout
        while True:
            if should_stop():
                return "stopped"
            self._keepalive()
            self.bell.clear()
            if self.my_turn():
                return "turn"
            if not self.alive:
                return "lost"
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            self.bell.wait(min(left, step))

    def _keepalive(self) -> None:
        hub = self.hub
        if hub is None:
            return
        hub.keepalive()
        if hub.lease_id is None or hub.lease_generation != self._generation:
            with contextlib.suppress(LockError):  # etcd trouble: the stream reports it
                self._register()  # the lease lapsed (a long pause): back into the queue

    def close(self, *, leave_queue: bool = True) -> None:
        """Leave the group's watch and (by default) the queue. Never raises."""
        if leave_queue and self._queued:
            self._queued = False
            try:
                self.etcd.call(lambda c: c.delete(self.wkey))
            except LockError as exc:
                log.info("could not leave the reboot queue (the key expires with its lease): %s", exc)
        if self.hub is not None:
            self.hub.leave(self.wkey)
            self.hub = None
