"""The reboot semaphore in etcd v3, in Airlock's layout, changed only by compare-and-swap.

Key   `com.coreos.airlock/groups/<url-escaped group>/v1/semaphore`
Value `{"total_slots":N,"holders":["id",...]}` (sorted ids, compact: byte for byte what Airlock's
      Go json.Marshal writes), so Airlock servers (and the Zincati hosts behind them) share it.

Take times for stale-holder recovery live in a *sibling* key, `.../v1/obelisk-taken`
(`{"taken": {"<id>": "<UTC ISO time>"}, "reclaims": [...]}`), never inside the semaphore value:
Airlock decodes the value into a two-field struct and writes that struct back, so an extra field
would be silently dropped by the first Airlock write, and a stricter reader might reject it. The
sibling key is written in the same transaction as the semaphore (guarded by the semaphore's
mod_revision), so the two never disagree because of us; a holder added by Airlock has no take
time yet and is stamped with the time obelisk first sees it, which only ever delays a reclaim.

Every change is one etcd transaction: `If(mod_revision(semaphore) == read) Then(put semaphore, put
taken)`. mod_revision (not Airlock's per-key Version) because it is unique across the store, so a
key deleted and re-created in between cannot pass for the one we read. etcd3gw has no helper for
a compare on MOD or for multi-op transactions, so these go through its `transaction()` call, which
posts the raw txn to the gateway. Reads are one linearizable txn with three range ops (both keys
and the count of the waiting queue, at one revision), and a read fails (never goes stale) when the
cluster has lost quorum.

The key layout is in keys.py, the value's decoding in state.py, the bounds (JSON depth, slot
count, lock ids, etcd's request size) in limits.py, the waiting queue and its watch in watch.py.
"""

from __future__ import annotations

import base64
import copy
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from .endpoints import EtcdEndpoints
from .errors import (
    CorruptSemaphore,
    EtcdRefused,
    EtcdUnavailable,
    LockError,
    SemaphoreConflict,
    SemaphoreTooBig,
    SlotsFull,
)
from .keys import b64, sem_key, taken_key, waiting_key, waiting_prefix_range
from .limits import ETCD_MAX_REQUEST_BYTES, TXN_OVERHEAD, check_holder_id, check_slots
from .state import SemaphoreState, iso, load_taken, parse_semaphore
from .watch import TurnWatcher

# The names the lock's users import from here (the FleetLock server, the CLI, tests).
__all__ = [
    "CorruptSemaphore", "EtcdEndpoints", "EtcdSemaphore", "EtcdUnavailable", "LockError", "SemaphoreState",
    "SlotsFull", "parse_semaphore", "sem_key", "taken_key",
]

log = logging.getLogger("obelisk.reboot.lock")


class EtcdSemaphore:
    """One group's semaphore. Thread-safe (each thread gets its own HTTP sessions)."""

    def __init__(self, endpoints: EtcdEndpoints, group: str = "default", *,
                 stale_after: timedelta | None = None, default_slots: int = 1,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), queue: bool = False) -> None:
        self.etcd = endpoints
        self.group = group
        # queue: a host's first lock attempt defers to hosts already queued (watch.py) when they
        # could take every free slot: it joins the queue instead of racing them for the slot, so a
        # fleet starting at once does not pile CAS txns on the one key. Off for the FleetLock
        # server and the CLI, whose callers (Zincati, an operator) are not in the queue.
        self.queue = queue
        self.stale_after = stale_after
        self.default_slots = check_slots(default_slots)
        self.clock = clock
        self.key = sem_key(group)
        self.tkey = taken_key(group)
        self._watchers: dict[str, TurnWatcher] = {}  # holder -> TurnWatcher while that holder waits for a slot
        self._watch_lock = threading.Lock()
        self._cached: SemaphoreState | None = None  # the last state seen: the next CAS starts from it

    # -- reading -------------------------------------------------------------------------------

    def _range_ops(self) -> list[dict[str, Any]]:
        wkey, wend = waiting_prefix_range(self.group)
        return [{"request_range": {"key": b64(self.key)}}, {"request_range": {"key": b64(self.tkey)}},
                {"request_range": {"key": wkey, "range_end": wend, "count_only": True}}]

    def read(self) -> SemaphoreState:
        resp = self.etcd.call(lambda c: c.transaction({"compare": [], "success": self._range_ops(), "failure": []}))
        return self._parse_ranges(resp)

    def _parse_ranges(self, resp: dict[str, Any]) -> SemaphoreState:
        responses = resp.get("responses") or []
        if len(responses) != 3:
            raise LockError(f"unexpected answer from etcd for {self.key}: {str(resp)[:200]}")
        sem_kvs = responses[0].get("response_range", {}).get("kvs") or []
        taken_kvs = responses[1].get("response_range", {}).get("kvs") or []
        if not sem_kvs:
            state = SemaphoreState(self.group, False)
        else:
            kv = sem_kvs[0]
            state = parse_semaphore(self.group, base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))
        if taken_kvs:
            load_taken(state, base64.b64decode(taken_kvs[0].get("value", "")))
        state.queued = int(responses[2].get("response_range", {}).get("count") or 0)
        self._cached = state
        return state

    # -- writing -------------------------------------------------------------------------------

    def _write(self, old: SemaphoreState, new: SemaphoreState, delete: str | None = None) -> SemaphoreState | None:
        """CAS on the semaphore's mod_revision (0 = the key must not exist). None if it won, else
        the current state, read by the same txn's failure branch (no second round trip).
        `delete`: a key removed in the same txn (the winner's waiting key, see watch.py)."""
        value, taken = new.value(), new.taken_value()
        self._check_size(value, taken)
        success: list[dict[str, Any]] = [
            {"request_put": {"key": b64(self.key), "value": b64(value)}},
            {"request_put": {"key": b64(self.tkey), "value": b64(taken)}}]
        if delete:
            success.append({"request_delete_range": {"key": b64(delete)}})
        txn = {
            "compare": [{"key": b64(self.key), "target": "MOD", "result": "EQUAL",
                         "mod_revision": str(old.mod_revision)}],
            "success": success,
            "failure": self._range_ops(),
        }
        try:
            resp = self.etcd.call(lambda c: c.transaction(txn))
        except EtcdRefused as exc:
            if "too large" not in exc.detail:
                raise
            # A cluster run with a smaller --max-request-bytes than etcd's default.
            raise SemaphoreTooBig(f"semaphore {self.key} is too big for etcd's request size limit "
                                  f"({exc.detail}); {self._too_big_fix()}") from None
        if resp.get("succeeded"):  # the gateway omits "succeeded" when it is false
            # The txn's revision is the new mod_revision of the key, so the next CAS can start from it.
            new.mod_revision = int((resp.get("header") or {}).get("revision") or 0)
            self._cached = copy.deepcopy(new) if new.mod_revision else None
            return None
        return self._parse_ranges(resp)

    def _check_size(self, value: str, taken: str) -> None:
        size = len(value.encode()) + len(taken.encode()) + len(self.key) + len(self.tkey) + TXN_OVERHEAD
        if size > ETCD_MAX_REQUEST_BYTES:
            raise SemaphoreTooBig(f"semaphore {self.key} would exceed etcd's request size limit "
                                  f"({size} of {ETCD_MAX_REQUEST_BYTES} bytes); {self._too_big_fix()}")

    def _too_big_fix(self) -> str:
        return (f"remove stale holders with 'obelisk lock unlock --group {self.group} --id ID' "
                "(see 'obelisk lock status')")

    def _update(self, plan: Callable[[SemaphoreState], SemaphoreState | None], attempts: int = 50,
                delete: str | None = None) -> SemaphoreState:
        """Plan a change from the last state seen, CAS it; on conflict plan again from the state the
        failed txn read back. plan returns None for 'nothing to write'.

        The first attempt starts from the state this object last saw (its own write or read), so
        an uncontended lock or unlock is one round trip; a plan that would write nothing is only
        trusted on a fresh read. A lost CAS means another write landed, and the failed txn already
        returned it: plan again at once (a sub-millisecond jitter only de-synchronises two losers).
        Backing off here is what made releases wait seconds behind a crowd of lock attempts."""
        # Copies: plans stamp take times into the state they are given, and the cache is shared
        # by the threads of a FleetLock server.
        cached = self._cached
        old = copy.deepcopy(cached if cached is not None else self.read())
        fresh = cached is None
        for _ in range(attempts):
            new = plan(old)
            if new is None:
                if fresh:
                    return old
                old, fresh = copy.deepcopy(self.read()), True
                continue
            current = self._write(old, new, delete)
            if current is None:
                return new
            old, fresh = copy.deepcopy(current), True
            time.sleep(random.uniform(0, 0.001))
        raise SemaphoreConflict(f"semaphore {self.key} kept changing under us ({attempts} tries); retry later")

    def _stamp(self, state: SemaphoreState, now: datetime) -> None:
        for h in state.holders:
            state.taken.setdefault(h, now)

    def ensure(self, slots: int | None = None) -> SemaphoreState:
        """Create the semaphore if absent (Airlock's create-if-absent); never changes an existing one."""
        total = self.default_slots if slots is None else check_slots(slots)

        def plan(s: SemaphoreState) -> SemaphoreState | None:
            if s.exists:
                return None
            return SemaphoreState(self.group, True, total)
        return self._update(plan)

    def lock(self, holder: str) -> SemaphoreState:
        """Take a slot for `holder` (re-entrant). Raises SlotsFull when every slot is held by others
        and none is stale; reclaims the oldest stale holder's slot when stale_after allows."""
        check_holder_id(holder)

        full: list[str] = []

        def plan(s: SemaphoreState) -> SemaphoreState | None:
            full.clear()
            if not s.exists:
                s = SemaphoreState(self.group, True, self.default_slots, mod_revision=0)
            if holder in s.holders:
                return None  # recursive lock: already ours, no write (as Airlock)
            now = self.clock()
            unstamped = [h for h in s.holders if h not in s.taken]
            self._stamp(s, now)
            new = SemaphoreState(s.group, True, s.total_slots, list(s.holders), dict(s.taken), list(s.reclaims),
                                 s.mod_revision, dict(s.extra))
            if self.queue and s.queued and new.free <= s.queued and not self._in_queue(holder):
                # Hosts queued before us could take every free slot: join the queue behind them.
                full.append(f"{new.free} free slot(s) of group '{self.group}' and {s.queued} host(s) "
                            "queued for them")
                return None
            if len(new.holders) >= new.total_slots:
                victim = self._stale_victim(new, now)
                if victim is None:
                    full.append(f"all {s.total_slots} slot(s) of group '{self.group}' are held "
                                f"({', '.join(sorted(s.holders)) or 'none'})")
                    # Holders that came in through Airlock have no take time: record when we first saw
                    # them, or they could never go stale.
                    return new if unstamped and self.stale_after is not None else None
                new.holders.remove(victim)
                since = new.taken.pop(victim)
                new.reclaims.append({"id": victim, "taken": iso(since), "reclaimed": iso(now), "by": holder})
                log.warning("reclaimed stale reboot slot of %s in group %s: held since %s "
                            "(stale after %s), taken by %s", victim, self.group, iso(since), self.stale_after, holder)
            new.holders = sorted(new.holders + [holder])
            new.taken[holder] = now
            return new

        state = self._update(plan, delete=waiting_key(self.group, holder))
        if full:
            raise SlotsFull(full[0])
        if holder not in state.holders:  # unreachable unless a plan bug: never report a lock we do not hold
            raise LockError(f"{holder} is not a holder of {self.key} after locking")
        return state

    def _stale_victim(self, s: SemaphoreState, now: datetime) -> str | None:
        if self.stale_after is None:
            return None
        stale = [(s.taken[h], h) for h in s.holders if h in s.taken and now - s.taken[h] >= self.stale_after]
        return min(stale)[1] if stale else None

    def unlock(self, holder: str) -> bool:
        """Give back `holder`'s slot if it holds one (no write otherwise). True if it was held.

        This is how an operator shrinks a semaphore grown too big for etcd (SemaphoreTooBig), so it
        must go through even then: when the write with take times does not fit, it is made again
        without them (they cost only reclaim timing: holders are stamped afresh when next seen)."""
        released = False
        keep_taken = True

        def plan(s: SemaphoreState) -> SemaphoreState | None:
            nonlocal released
            released = False
            if not s.exists or holder not in s.holders:
                return None
            now = self.clock()
            self._stamp(s, now)
            taken = {h: t for h, t in s.taken.items() if h != holder} if keep_taken else {}
            new = SemaphoreState(s.group, True, s.total_slots, [h for h in s.holders if h != holder],
                                 taken, list(s.reclaims), s.mod_revision, dict(s.extra))
            released = True
            return new

        try:
            self._update(plan)
        except SemaphoreTooBig as exc:
            log.warning("%s; giving back %s's slot without the take times", exc, holder)
            keep_taken = False
            self._update(plan)
        return released

    def set_max(self, slots: int) -> tuple[int, int]:
        """Set total_slots (creating the semaphore if needed). Returns (old, new)."""
        check_slots(slots)
        old_total = 0

        def plan(s: SemaphoreState) -> SemaphoreState | None:
            nonlocal old_total
            old_total = s.total_slots if s.exists else 0
            self._stamp(s, self.clock())
            return SemaphoreState(self.group, True, slots, list(s.holders), dict(s.taken), list(s.reclaims),
                                  s.mod_revision, dict(s.extra))

        self._update(plan)
        return old_total, slots

    # -- waiting for a slot (watch.py) ---------------------------------------------------------

    def wait_turn(self, holder: str, timeout: float, should_stop: Callable[[], bool], step: float = 1.0) -> str:
        """After SlotsFull: block until a slot is worth trying for `holder` ("turn"), up to timeout
        ("timeout"), or until the watch is lost ("lost": the caller backs off and polls; the next
        call opens a new watch) or should_stop ("stopped"). Joins the group's waiting queue."""
        with self._watch_lock:
            w = self._watchers.get(holder)
        if w is None or not w.alive:
            if w is not None:
                w.close(leave_queue=False)  # keep the key: the new watcher re-puts it and keeps its place
                with self._watch_lock:
                    self._watchers.pop(holder, None)
            try:
                w = TurnWatcher(self.etcd, self.group, holder).start()
            except LockError as exc:
                log.info("cannot watch %s (%s): polling instead", self.key, exc)
                return "lost"
            with self._watch_lock:
                self._watchers[holder] = w
        result = w.wait(timeout, should_stop, step)
        if result == "turn":
            hub = w.hub
            seen = hub.state() if hub is not None else None
            if seen is not None:
                self._cached = seen
            time.sleep(random.uniform(0, 0.002))  # two waiters woken by one event should not CAS in lockstep
        return result

    def _in_queue(self, holder: str) -> bool:
        with self._watch_lock:
            return holder in self._watchers

    def stop_waiting(self, holder: str, *, won: bool = False) -> None:
        """Close the watch and leave the waiting queue (after winning, giving up or stopping).
        won: the lock's CAS already deleted the waiting key, so no round trip is spent on it."""
        with self._watch_lock:
            w = self._watchers.pop(holder, None)
        if w is not None:
            w.close(leave_queue=not won)
