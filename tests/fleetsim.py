"""A simulated fleet rolling through a real semaphore: N host threads, each running the real
RebootCoordinator (etcd-lock) with a "reboot" that is a short sleep. Used by the safety tests and
`bench/fleet.py`. Each host records enter/leave of its reboot while holding the slot, so the
largest number of simultaneous reboots is measured directly (and by the caller from etcd history).

Every run has a deadline: past it every host stops waiting and stops retrying (its lock calls
fail at once, its naps end), and run_fleet raises FleetTimeout naming how many hosts never
rebooted and their last error, so a cluster that lost quorum fails a test in seconds instead of
leaving 50 threads retrying for ever.

Kept free of pytest and of the other test helpers: bench/fleet.py imports it too.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from update_engine.reboot.coordinator import RebootCoordinator
from update_engine.reboot.errors import LockError
from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore, parse_semaphore, sem_key


class FleetTimeout(AssertionError):
    """The fleet did not finish by its deadline."""


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
    released: bool = False
    last_error: str | None = None


class _TimedSemaphore(EtcdSemaphore):
    """Counts attempts and times the successful lock and the release (the latency locking adds)."""

    def __init__(self, *a, stop_at: float, **kw) -> None:
        super().__init__(*a, **kw)
        self.stop_at = stop_at
        self.attempts = 0
        self.lock_call = 0.0
        self.release_call = 0.0

    def _check_deadline(self) -> None:
        if time.monotonic() > self.stop_at:
            raise LockError("the fleet's deadline passed")

    def lock(self, holder: str):
        self._check_deadline()
        self.attempts += 1
        t = time.monotonic()
        state = super().lock(holder)
        self.lock_call = time.monotonic() - t
        return state

    def unlock(self, holder: str) -> bool:
        self._check_deadline()
        t = time.monotonic()
        try:
            return super().unlock(holder)
        finally:
            self.release_call = time.monotonic() - t


def run_fleet(endpoints: str, group: str, hosts: int, reboot_time: float, *,
              should_stop: Callable[[], bool] = lambda: False, retry_min: float = 0.02, retry_max: float = 0.3,
              timeout: float = 1.0, tracker: Tracker | None = None, watch: bool = True, watch_fallback: float = 5.0,
              on_progress: Callable[[int], None] | None = None,
              deadline: float = 120.0) -> tuple[list[HostResult], Tracker]:
    """Roll `hosts` hosts through the group; returns when every host rebooted and released, or
    was stopped by should_stop. Raises FleetTimeout when `deadline` seconds pass first."""
    tracker = tracker or Tracker()
    stop_at = time.monotonic() + deadline

    def stop() -> bool:
        return time.monotonic() > stop_at or should_stop()

    def nap(seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, stop_at - time.monotonic())))

    results: list[HostResult] = [HostResult(f"host-{i:03d}", False) for i in range(hosts)]
    done = [0]
    done_lock = threading.Lock()

    def host(i: int) -> None:
        res = results[i]
        sem = _TimedSemaphore(EtcdEndpoints(endpoints, timeout=timeout), group, queue=watch, stop_at=stop_at)
        coord = RebootCoordinator("etcd-lock", res.host, lock=sem, courtesy_delay=0, retry_min=retry_min,
                                  retry_max=retry_max, poll=0.05, release_attempts=50, watch=watch,
                                  watch_fallback=watch_fallback, sleep=nap)
        start = time.monotonic()
        won = [0.0]

        def reboot() -> None:
            won[0] = time.monotonic()
            tracker.enter(res.host)
            time.sleep(reboot_time)
            tracker.leave(res.host)

        res.rebooted = coord.wait_and_reboot(reboot, stop)
        if res.rebooted:
            res.wait = won[0] - start
            try:
                coord.release_after_boot()  # the host is "back and marked good"
                res.released = True
            except LockError:
                pass  # last_error says why; the caller's checks see released=False
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
        t.join(max(0.0, stop_at - time.monotonic()) + 10)  # the grace: a host's last etcd call
    late = [r for r in results if not r.rebooted or not r.released]
    if time.monotonic() > stop_at and late:
        errors = sorted({r.last_error or "none" for r in late})
        raise FleetTimeout(f"fleet of {hosts} did not finish in {deadline:.0f}s: {len(late)} host(s) never "
                           f"rebooted or released; last errors: {'; '.join(errors)[:600]}")
    return results, tracker


def holders_history(endpoints: str, group: str, from_revision: int = 1) -> list[tuple[int, int, int]]:
    """(revision, total_slots, holders) for every version of the semaphore since from_revision,
    read back from etcd's MVCC history (nothing compacts it in a test cluster)."""
    sem = EtcdSemaphore(EtcdEndpoints(endpoints), group)
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
