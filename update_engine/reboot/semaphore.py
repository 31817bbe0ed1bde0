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
posts the raw txn to the gateway. Reads are one linearizable txn with two range ops: both keys at
one revision, and a read fails (never goes stale) when the cluster has lost quorum.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote_plus, urlsplit

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from obelisk.errors import ObeliskError

log = logging.getLogger("obelisk.reboot.lock")

SEM_KEY = "com.coreos.airlock/groups/{group}/v1/semaphore"
TAKEN_KEY = "com.coreos.airlock/groups/{group}/v1/obelisk-taken"
RECLAIMS_KEPT = 20
T = TypeVar("T")


class LockError(ObeliskError, RuntimeError):
    """A lock operation failed; str() is one line for the user."""

    kind = "failed_lock"


class EtcdUnavailable(LockError):
    kind = "etcd_unavailable"


class CorruptSemaphore(LockError):
    kind = "corrupt_semaphore"


class SlotsFull(LockError):
    kind = "failed_lock"


class SemaphoreConflict(LockError):
    kind = "conflict"


def sem_key(group: str) -> str:
    # Go's url.QueryEscape, as Airlock uses: quote_plus with nothing kept but unreserved chars.
    return SEM_KEY.format(group=quote_plus(group, safe=""))


def taken_key(group: str) -> str:
    return TAKEN_KEY.format(group=quote_plus(group, safe=""))


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_iso(s: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(s).replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


@dataclass
class SemaphoreState:
    group: str
    exists: bool
    total_slots: int = 0
    holders: list[str] = field(default_factory=list)
    taken: dict[str, datetime] = field(default_factory=dict)
    reclaims: list[dict[str, Any]] = field(default_factory=list)
    mod_revision: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # fields we do not know: kept as they are
    queued: int = 0  # obelisk hosts waiting in the group's queue (watch.py); never written back

    @property
    def free(self) -> int:
        return max(0, self.total_slots - len(self.holders))

    def value(self) -> str:
        doc: dict[str, Any] = {"total_slots": self.total_slots, "holders": sorted(self.holders)}
        doc.update(self.extra)
        return json.dumps(doc, separators=(",", ":"))

    def taken_value(self) -> str:
        taken = {h: _iso(self.taken[h]) for h in sorted(self.holders) if h in self.taken}
        return json.dumps({"taken": taken, "reclaims": self.reclaims[-RECLAIMS_KEPT:]}, separators=(",", ":"))

    def to_json(self, now: datetime, stale_after: timedelta | None) -> dict[str, Any]:
        holders = []
        for h in sorted(self.holders):
            t = self.taken.get(h)
            holders.append({
                "id": h,
                "taken": _iso(t) if t else None,
                "held_seconds": round((now - t).total_seconds(), 1) if t else None,
                "stale": bool(t and stale_after and now - t >= stale_after),
            })
        return {"group": self.group, "key": sem_key(self.group), "initialized": self.exists,
                "total_slots": self.total_slots, "available": self.free, "holders": holders,
                "reclaims": self.reclaims, "mod_revision": self.mod_revision, "queued": self.queued}


def parse_semaphore(group: str, raw: bytes, mod_revision: int) -> SemaphoreState:
    """Decode the semaphore value; anything Airlock could not read is CorruptSemaphore."""
    key = sem_key(group)
    fix = f"fix or delete it ('etcdctl del {key}') and retry; obelisk refuses to overwrite it"
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptSemaphore(f"semaphore {key} is not valid JSON ({exc.__class__.__name__}: {exc}); {fix}") from None
    if not isinstance(doc, dict):
        raise CorruptSemaphore(f"semaphore {key} is not a JSON object; {fix}")
    total = doc.pop("total_slots", None)
    holders = doc.pop("holders", None)
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise CorruptSemaphore(f"semaphore {key}: total_slots is {total!r}, not a whole number >= 0; {fix}")
    if holders is None:
        holders = []  # Go marshals a nil slice as null
    if not isinstance(holders, list) or not all(isinstance(h, str) for h in holders):
        raise CorruptSemaphore(f"semaphore {key}: holders is not a list of strings; {fix}")
    return SemaphoreState(group, True, total, list(holders), mod_revision=mod_revision, extra=doc)


class EtcdEndpoints:
    """etcd3gw clients for a comma list of URLs, one set per thread, failing over on errors.

    etcd3gw talks to one host; a cluster client needs to move on when a member is down, so this
    tries the members in turn (starting with the last that answered) and raises EtcdUnavailable
    naming them all when none answers. etcd answers 503 ("no leader", "request timed out") when
    quorum is lost; that is treated like a dead member, so without quorum nothing succeeds.
    """

    def __init__(self, urls: list[str] | str, *, cafile: str | None = None, certfile: str | None = None,
                 keyfile: str | None = None, timeout: float = 5.0) -> None:
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        if not urls:
            raise LockError("no etcd endpoint given: pass --endpoint http://HOST:2379 or set ENDPOINT in lock.conf")
        self.urls = list(urls)
        for what, path in (("CA file", cafile), ("client certificate", certfile), ("client key", keyfile)):
            if path and not os.access(path, os.R_OK):
                raise LockError(f"{what} {path} is missing or unreadable: check --cafile/--certfile/--keyfile "
                                "(CAFILE/CERTFILE/KEYFILE in lock.conf)")
        self.cafile, self.certfile, self.keyfile = cafile, certfile, keyfile
        self.timeout = timeout
        self._local = threading.local()
        self._preferred = 0

    def _clients(self) -> list[Etcd3Client]:
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = [self._make(u) for u in self.urls]
            self._local.clients = clients
        return clients

    def _make(self, url: str) -> Etcd3Client:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LockError(f"bad etcd URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        # api_path fixed to /v3/ (etcd >= 3.4) so no client spends a round trip on /version discovery.
        session = requests.Session()
        if self.cafile:
            session.verify = self.cafile
            # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's verify (psf/requests#3829):
            # with our own CA we must not read the environment, or the etcd CA is silently ignored.
            session.trust_env = False
        if self.certfile and self.keyfile:
            session.cert = (self.certfile, self.keyfile)
        return Etcd3Client(host=parts.hostname, port=parts.port or 2379, protocol=parts.scheme,
                           timeout=self.timeout, api_path="/v3/", session=session)

    def call(self, fn: Callable[[Etcd3Client], T]) -> T:
        clients = self._clients()
        errors = []
        start = self._preferred
        for i in range(len(clients)):
            idx = (start + i) % len(clients)
            try:
                result = fn(clients[idx])
            except (etcd_exc.Etcd3Exception, OSError) as exc:
                detail = getattr(exc, "detail_text", None) or str(exc) or exc.__class__.__name__
                errors.append(f"{self.urls[idx]}: {_short(detail)}")
                continue
            self._preferred = idx
            return result
        raise EtcdUnavailable(
            "etcd unavailable (no member answered or the cluster has no quorum): " + "; ".join(errors)
            + "; check the etcd members and retry"
        )


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    try:
        doc = json.loads(text)
        if isinstance(doc, dict):
            text = doc.get("error") or doc.get("message") or text
    except ValueError:
        pass
    if "Connection refused" in text:
        return "connection refused"
    if "certificate verify failed" in text:
        why = text.split("certificate verify failed:")[-1].split("(_ssl")[0].strip(" ')(\"")
        return f"TLS: etcd's certificate is not trusted ({why[:80]}): pass --cafile / set CAFILE to the etcd CA"
    if "SSLEOFError" in text or "certificate required" in text or ("alert" in text.lower() and "SSL" in text):
        return ("TLS handshake refused by etcd: it probably requires a client certificate "
                "(--certfile/--keyfile, CERTFILE/KEYFILE)")
    if "SSLError" in text:
        return "TLS failed: " + text[text.find("SSLError"):][:140]
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timed out" if "etcdserver" not in text else text[:120]
    return text[:160]


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
        self.default_slots = default_slots
        self.clock = clock
        self.key = sem_key(group)
        self.tkey = taken_key(group)
        self._watchers: dict[str, Any] = {}  # holder -> TurnWatcher while that holder waits for a slot
        self._watch_lock = threading.Lock()
        self._cached: SemaphoreState | None = None  # the last state seen: the next CAS starts from it

    # -- reading -------------------------------------------------------------------------------

    def _range_ops(self) -> list[dict[str, Any]]:
        from .watch import waiting_prefix_range

        wkey, wend = waiting_prefix_range(self.group)
        return [{"request_range": {"key": _b64(self.key)}}, {"request_range": {"key": _b64(self.tkey)}},
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
            self._load_taken(state, base64.b64decode(taken_kvs[0].get("value", "")))
        state.queued = int(responses[2].get("response_range", {}).get("count") or 0)
        self._cached = state
        return state

    def _load_taken(self, state: SemaphoreState, raw: bytes) -> None:
        try:
            doc = json.loads(raw)
            taken = doc.get("taken") or {}
            reclaims = doc.get("reclaims") or []
        except (ValueError, AttributeError):
            # Our own advisory key: a broken one costs only take times, so note it and restamp.
            log.warning("ignoring unreadable %s; holders get a fresh take time", self.tkey)
            return
        for h, t in taken.items() if isinstance(taken, dict) else []:
            ts = _parse_iso(t)
            if ts and h in state.holders:
                state.taken[h] = ts
        if isinstance(reclaims, list):
            state.reclaims = [r for r in reclaims if isinstance(r, dict)]

    # -- writing -------------------------------------------------------------------------------

    def _write(self, old: SemaphoreState, new: SemaphoreState, delete: str | None = None) -> SemaphoreState | None:
        """CAS on the semaphore's mod_revision (0 = the key must not exist). None if it won, else
        the current state, read by the same txn's failure branch (no second round trip).
        `delete`: a key removed in the same txn (the winner's waiting key, see watch.py)."""
        success: list[dict[str, Any]] = [
            {"request_put": {"key": _b64(self.key), "value": _b64(new.value())}},
            {"request_put": {"key": _b64(self.tkey), "value": _b64(new.taken_value())}}]
        if delete:
            success.append({"request_delete_range": {"key": _b64(delete)}})
        txn = {
            "compare": [{"key": _b64(self.key), "target": "MOD", "result": "EQUAL",
                         "mod_revision": str(old.mod_revision)}],
            "success": success,
            "failure": self._range_ops(),
        }
        resp = self.etcd.call(lambda c: c.transaction(txn))
        if resp.get("succeeded"):  # the gateway omits "succeeded" when it is false
            # The txn's revision is the new mod_revision of the key, so the next CAS can start from it.
            new.mod_revision = int((resp.get("header") or {}).get("revision") or 0)
            self._cached = copy.deepcopy(new) if new.mod_revision else None
            return None
        return self._parse_ranges(resp)

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
        def plan(s: SemaphoreState) -> SemaphoreState | None:
            if s.exists:
                return None
            return SemaphoreState(self.group, True, slots if slots is not None else self.default_slots)
        return self._update(plan)

    def lock(self, holder: str) -> SemaphoreState:
        """Take a slot for `holder` (re-entrant). Raises SlotsFull when every slot is held by others
        and none is stale; reclaims the oldest stale holder's slot when stale_after allows."""
        if not holder:
            raise LockError("empty holder id")

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
                new.reclaims.append({"id": victim, "taken": _iso(since), "reclaimed": _iso(now), "by": holder})
                log.warning("reclaimed stale reboot slot of %s in group %s: held since %s "
                            "(stale after %s), taken by %s", victim, self.group, _iso(since), self.stale_after, holder)
            new.holders = sorted(new.holders + [holder])
            new.taken[holder] = now
            return new

        from .watch import waiting_key

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
        """Give back `holder`'s slot if it holds one (no write otherwise). True if it was held."""
        released = False

        def plan(s: SemaphoreState) -> SemaphoreState | None:
            nonlocal released
            released = False
            if not s.exists or holder not in s.holders:
                return None
            now = self.clock()
            self._stamp(s, now)
            new = SemaphoreState(s.group, True, s.total_slots, [h for h in s.holders if h != holder],
                                 {h: t for h, t in s.taken.items() if h != holder}, list(s.reclaims),
                                 s.mod_revision, dict(s.extra))
            released = True
            return new

        self._update(plan)
        return released

    def set_max(self, slots: int) -> tuple[int, int]:
        """Set total_slots (creating the semaphore if needed). Returns (old, new)."""
        if slots < 0:
            raise LockError(f"slot count must be 0 or more, not {slots}")
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
        from .watch import TurnWatcher

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
            seen = hub.state(self._load_taken) if hub is not None else None
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
