"""Waiting for a reboot slot without polling: a watch on the group's keys and a queue of waiters.

A host that finds every slot taken registers a waiting key, `.../v1/obelisk-waiting/<id>`, bound to
a lease (so a waiter that dies drops out of the queue after `lease_ttl`), reads the group's keys
once, then follows them through one etcd watch stream. Waiters are ordered by their key's
create_revision; a waiter tries the CAS only when the free slots outnumber the waiters ahead of it,
so a release wakes the next host in line instead of every host at once (a herd of CAS txns on the
one semaphore key would make releases lose their CAS races and stall the fleet). The queue is
advisory: the semaphore's CAS alone keeps the safety, and Airlock/Zincati hosts, which know
nothing of it, still compete as before. The winner's CAS deletes its waiting key in the same txn.

The stream is read here, not through etcd3gw's Watcher: that one gives no sign when its stream
dies (a member killed, a compaction), and a dead watch must be told apart from a quiet one so the
caller falls back to polling (see RebootCoordinator.watch_fallback) and the next wait opens a new
watch. It still goes through etcd3gw's client (its session, TLS settings and URL building).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import quote_plus

from .semaphore import EtcdEndpoints, LockError, SemaphoreState, parse_semaphore, sem_key

log = logging.getLogger("obelisk.reboot.watch")

WAIT_PREFIX = "com.coreos.airlock/groups/{group}/v1/"


def group_prefix(group: str) -> str:
    return WAIT_PREFIX.format(group=quote_plus(group, safe=""))


def waiting_key(group: str, holder: str) -> str:
    return group_prefix(group) + "obelisk-waiting/" + quote_plus(holder, safe="")


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _prefix_end(prefix: str) -> str:
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class TurnWatcher:
    """One waiting host's view of its group: semaphore, waiting queue, and whether it is its turn."""

    def __init__(self, endpoints: EtcdEndpoints, group: str, holder: str, *, lease_ttl: int = 30) -> None:
        self.etcd = endpoints
        self.group = group
        self.holder = holder
        self.lease_ttl = lease_ttl
        self.prefix = group_prefix(group)
        self.skey = sem_key(group)
        self.wkey = waiting_key(group, holder)
        self.waiting_prefix = self.prefix + "obelisk-waiting/"
        self._cond = threading.Condition()
        self._sem: SemaphoreState | None = None
        self._waiting: dict[str, int] = {}  # waiting key -> create_revision (queue order)
        self._lease_id: int | None = None
        self._refreshed = 0.0
        self._response = None
        self._closed = False
        self.alive = False
        self.events = 0  # watch events seen (tests, bench)

    # -- setup ---------------------------------------------------------------------------------

    def start(self) -> TurnWatcher:
        """Join the queue, read the group's keys, open the watch. Raises LockError if etcd fails."""
        self._register()
        revision = self._snapshot()
        ready = threading.Event()
        t = threading.Thread(target=self._stream, args=(revision + 1, ready), daemon=True,
                             name=f"obelisk-watch-{self.holder}")
        t.start()
        ready.wait(self.etcd.timeout)
        return self

    def _register(self) -> None:
        def grant_and_put(c) -> int:
            lease = c.lease(self.lease_ttl)
            c.put(self.wkey, str(time.time()), lease=lease)
            return lease.id

        self._lease_id = self.etcd.call(grant_and_put)
        self._refreshed = time.monotonic()

    def _snapshot(self) -> int:
        body = {"key": _b64(self.prefix), "range_end": _prefix_end(self.prefix)}
        resp = self.etcd.call(lambda c: c.post(c.get_url("/kv/range"), json=body))
        with self._cond:
            self._waiting.clear()
            for kv in resp.get("kvs") or []:
                self._apply_put(kv)
        return int(resp["header"]["revision"])

    # -- the stream ----------------------------------------------------------------------------

    def _stream(self, start_revision: int, ready: threading.Event) -> None:
        body = {"create_request": {"key": _b64(self.prefix), "range_end": _prefix_end(self.prefix),
                                   "start_revision": str(start_revision)}}
        try:
            def open_stream(c):
                # No read timeout: a quiet group sends nothing for as long as the slots stay taken;
                # a stream that dies raises, and the waiter's own timeout bounds every wait anyway.
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
                with self._cond:
                    for ev in result.get("events") or []:
                        self.events += 1
                        if ev.get("type") == "DELETE":
                            self._apply_delete(ev["kv"])
                        else:
                            self._apply_put(ev["kv"])
                    self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - any end of the stream means "fall back to polling"
            if not self._closed:
                log.info("semaphore watch for %s ended (%s): falling back to polling", self.group, exc)
        finally:
            with self._cond:
                self.alive = False
                self._cond.notify_all()
            ready.set()

    def _apply_put(self, kv: dict) -> None:
        key = base64.b64decode(kv["key"]).decode(errors="replace")
        if key == self.skey:
            try:
                self._sem = parse_semaphore(self.group, base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))
            except LockError:
                self._sem = None  # corrupt: never our turn; the fallback lock() call reports it
        elif key.startswith(self.waiting_prefix):
            self._waiting[key] = int(kv["create_revision"])

    def _apply_delete(self, kv: dict) -> None:
        key = base64.b64decode(kv["key"]).decode(errors="replace")
        if key == self.skey:
            self._sem = None
        self._waiting.pop(key, None)

    # -- waiting -------------------------------------------------------------------------------

    def my_turn(self) -> bool:
        """Free slots outnumber the waiters queued ahead of this one (caller holds no lock)."""
        with self._cond:
            return self._my_turn()

    def _my_turn(self) -> bool:
        sem = self._sem
        if sem is None:
            return False
        if self.holder in sem.holders:
            return True  # re-entrant: lock() returns at once
        mine = self._waiting.get(self.wkey)
        ahead = sum(1 for rev in self._waiting.values() if mine is None or rev < mine)
        return sem.free > ahead

    def wait(self, timeout: float, should_stop: Callable[[], bool], step: float = 1.0) -> str:
        """Block until it is this host's turn ("turn"), the watch dies ("lost"), should_stop
        ("stopped") or timeout passes ("timeout"). Keeps the waiting key's lease alive."""
        deadline = time.monotonic() + timeout
        while True:
            if should_stop():
                return "stopped"
            self._keepalive()
            with self._cond:
                if self._my_turn():
                    return "turn"
                if not self.alive:
                    return "lost"
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                self._cond.wait(min(left, step))

    def _keepalive(self) -> None:
        if self._lease_id is None or time.monotonic() - self._refreshed < self.lease_ttl / 3:
            return
        body = {"ID": self._lease_id}
        try:
            resp = self.etcd.call(lambda c: c.post(c.get_url("/lease/keepalive"), json=body))
        except LockError:
            return  # etcd trouble: the stream notices too; the lease may lapse, which costs only queue order
        self._refreshed = time.monotonic()
        if int((resp.get("result") or {}).get("TTL", 0) or 0) <= 0:
            self._register()  # the lease lapsed (a long pause): rejoin at the back of the queue

    def close(self, *, leave_queue: bool = True) -> None:
        """Stop the stream and (by default) drop out of the queue. Never raises."""
        self._closed = True
        resp = self._response
        if resp is not None:
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
        if leave_queue and self._lease_id is not None:
            lease_id, self._lease_id = self._lease_id, None
            try:
                # Revoking the lease deletes the waiting key with it.
                self.etcd.call(lambda c: c.post(c.get_url("/kv/lease/revoke"), json={"ID": lease_id}))
            except LockError as exc:
                log.info("could not leave the reboot queue (the key expires with its lease): %s", exc)
