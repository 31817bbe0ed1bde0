"""A simulated fleet rolling through a real semaphore: N host threads, each running the real
RebootCoordinator (etcd-lock) with a "reboot" that is a short sleep. Used by the safety tests and
`bench/fleet.py`. Each host records enter/leave of its reboot while holding the slot, so the
largest number of simultaneous reboots is measured directly (and by the caller from etcd history).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .coordinator import RebootCoordinator
from .semaphore import EtcdEndpoints, EtcdSemaphore


@dataclass
class Tracker:
    inside: int = 0
    peak: int = 0
    rebooted: set[str] = field(default_factory=set)
    order: list[tuple[float, str, str]] = field(default_factory=list)  # (monotonic, "enter"/"leave", host)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, host: str) -> None:
        with self._lock:
            self.inside += 1
            self.peak = max(self.peak, self.inside)
            self.order.append((time.monotonic(), "enter", host))

    def leave(self, host: str) -> None:
        with self._lock:
            self.inside -= 1
            self.rebooted.add(host)
            self.order.append((time.monotonic(), "leave", host))


@dataclass
class HostResult:
    host: str
    rebooted: bool
    wait: float = 0.0  # start -> slot won
    lock_call: float = 0.0  # the successful lock round trip(s)
    release_call: float = 0.0
    lock_attempts: int = 0
    last_error: str | None = None


class _TimedSemaphore(EtcdSemaphore):
    """Counts attempts and times the successful lock and the release (the latency locking adds)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.attempts = 0
        self.lock_call = 0.0
        self.release_call = 0.0

    def lock(self, holder: str):
        self.attempts += 1
        t = time.monotonic()
        state = super().lock(holder)
        self.lock_call = time.monotonic() - t
        return state

    def unlock(self, holder: str) -> bool:
        t = time.monotonic()
        try:
            return super().unlock(holder)
        finally:
            self.release_call = time.monotonic() - t


def run_fleet(endpoints: str, group: str, hosts: int, reboot_time: float, *,
              should_stop: Callable[[], bool] = lambda: False, retry_min: float = 0.02, retry_max: float = 0.3,
              timeout: float = 1.0, tracker: Tracker | None = None, watch: bool = True, watch_fallback: float = 5.0,
              on_progress: Callable[[int], None] | None = None) -> tuple[list[HostResult], Tracker]:
    tracker = tracker or Tracker()
    results: list[HostResult] = [HostResult(f"host-{i:03d}", False) for i in range(hosts)]
    done = [0]
    done_lock = threading.Lock()

    def host(i: int) -> None:
        res = results[i]
        sem = _TimedSemaphore(EtcdEndpoints(endpoints, timeout=timeout), group, queue=watch)
        coord = RebootCoordinator("etcd-lock", res.host, lock=sem, courtesy_delay=0, retry_min=retry_min,
                                  retry_max=retry_max, poll=0.05, release_attempts=50, watch=watch,
                                  watch_fallback=watch_fallback)
        start = time.monotonic()
        won = [0.0]

        def reboot() -> None:
            won[0] = time.monotonic()
            tracker.enter(res.host)
            time.sleep(reboot_time)
            tracker.leave(res.host)

        res.rebooted = coord.wait_and_reboot(reboot, should_stop)
        if res.rebooted:
            coord.release_after_boot()  # the host is "back and marked good"
            res.wait = won[0] - start
        res.lock_call, res.release_call, res.lock_attempts = sem.lock_call, sem.release_call, sem.attempts
        res.last_error = coord.last_error
        with done_lock:
            done[0] += 1
            if on_progress:
                on_progress(done[0])

    threads = [threading.Thread(target=host, args=(i,), daemon=True) for i in range(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, tracker


def holders_history(endpoints: str, group: str, from_revision: int = 1) -> list[tuple[int, int, int]]:
    """(revision, total_slots, holders) for every version of the semaphore since from_revision,
    read back from etcd's MVCC history (nothing compacts it in a test cluster)."""
    sem = EtcdSemaphore(EtcdEndpoints(endpoints), group)
    from .semaphore import parse_semaphore, sem_key

    key = sem_key(group)
    out = []
    rev = sem.read().mod_revision
    while rev >= from_revision and rev > 0:
        kvs = sem.etcd.call(lambda c, r=rev: c.get(key, metadata=True, revision=r))
        if not kvs:
            break
        value, meta = kvs[0]
        mod = int(meta["mod_revision"])
        state = parse_semaphore(group, value, mod)
        out.append((mod, state.total_slots, len(state.holders)))
        create = int(meta["create_revision"])
        if mod <= create:
            break
        rev = mod - 1  # the version before this one is the latest at mod-1
    return sorted(out)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
