"""Reboot strategies: when a host with a staged update may reboot.

off          never reboot by itself (wait_and_reboot returns False at once)
reboot       reboot as soon as allowed by the window (if one is set)
etcd-lock    take a slot of the group's semaphore in etcd, then reboot
fleetlock    take the slot through a FleetLock server, then reboot
best-effort  etcd-lock when ENDPOINT is set in lock.conf, else reboot

Order inside wait_and_reboot: window open? -> lock -> window still open? (Flatcar's locksmith fix:
retries that drift past the window must not reboot outside it; we give the slot back and wait for
the next window) -> courtesy delay with a wall message if users are logged in -> reboot(). The lock
is held across the reboot and given back by release_after_boot() once the new slot is marked good.
Lock errors (etcd down, no quorum, slots full) never lead to a reboot: they back off and retry,
except that a host finding every slot taken waits on an etcd watch of the group (watch.py) and
retries as soon as a slot frees for it, with watch_fallback as the bound if an event is missed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from obelisk.errors import ObeliskError
from obelisk.lock_conf import LockConfig, load
from obelisk.update_conf import REBOOT_STRATEGIES
from obelisk.windows import WindowSet

from .endpoints import EtcdEndpoints
from .errors import LockError, SlotsFull
from .fleetlock import FleetLockClient
from .identity import host_id as machine_host_id
from .semaphore import EtcdSemaphore

log = logging.getLogger("obelisk.reboot")

STRATEGIES = REBOOT_STRATEGIES


class StrategyError(ObeliskError, ValueError):
    """The reboot strategy or the settings it needs are wrong; one line naming the key."""


class LockBackend(Protocol):
    def lock(self, holder: str) -> Any: ...
    def unlock(self, holder: str) -> bool: ...


def logged_in_users() -> list[str]:
    """Users with a session (utmp, via `who`); empty when `who` is unavailable."""
    from obelisk.tools import ToolError, run

    try:
        out = run(["who"], timeout=10).stdout
    except ToolError:
        return []
    return sorted({line.split()[0] for line in out.splitlines() if line.strip()})


def send_wall(message: str) -> None:
    from obelisk.tools import ToolError, run

    try:
        run(["wall", message], timeout=10)
    except ToolError as exc:
        log.warning("could not send the reboot notice to logged-in users: %s", exc)


@dataclass
class RebootCoordinator:
    strategy: str
    holder: str = ""
    windows: WindowSet = field(default_factory=WindowSet)
    lock: LockBackend | None = None
    courtesy_delay: float = 300.0
    retry_min: float = 5.0  # lock retries back off from here, doubling (locksmith: 5 s ... 5 min)
    retry_max: float = 300.0
    poll: float = 1.0  # longest uninterrupted sleep, so should_stop is seen promptly
    release_attempts: int = 5
    watch: bool = True  # wait on an etcd watch after SlotsFull (backends with wait_turn), not a back-off
    watch_fallback: float = 60.0  # longest wait on the watch before re-reading the semaphore anyway
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    sleep: Callable[[float], None] = time.sleep
    users: Callable[[], list[str]] = logged_in_users
    wall: Callable[[str], None] = send_wall
    state: str = "idle"
    last_error: str | None = None

    def _nap(self, seconds: float, should_stop: Callable[[], bool]) -> bool:
        """Sleep up to `seconds`, waking to check should_stop. False if asked to stop."""
        left = max(0.0, seconds)
        while True:
            if should_stop():
                return False
            if left <= 0:
                return True
            step = min(left, self.poll)
            self.sleep(step)  # counted, not measured, so an injected clock+sleep drive it in tests
            left -= step

    def _stop_waiting(self, won: bool = False) -> None:
        stop = getattr(self.lock, "stop_waiting", None)
        if stop is not None:
            stop(self.holder, won=won)

    def _release_quietly(self) -> None:
        if self.lock is None:
            return
        try:
            self.lock.unlock(self.holder)
        except LockError as exc:
            log.warning("could not give back the reboot slot (it stays held until released): %s", exc)

    def wait_and_reboot(self, reboot: Callable[[], None], should_stop: Callable[[], bool]) -> bool:
        if self.strategy == "off":
            self.state = "off"
            return False
        delay = self.retry_min
        while True:
            if should_stop():
                self._stop_waiting()
                self.state = "stopped"
                return False
            now = self.clock()
            if not self.windows.is_open(now):
                self._stop_waiting()  # out of the queue while the window is shut: others go first
                self.state = "waiting-for-window"
                wait = (self.windows.next_open(now) - now).total_seconds()
                if not self._nap(min(wait, 60.0), should_stop):
                    return False
                continue
            if self.lock is not None:
                self.state = "waiting-for-lock"
                try:
                    self.lock.lock(self.holder)
                except LockError as exc:
                    self.last_error = str(exc)
                    if isinstance(exc, SlotsFull) and self.watch and hasattr(self.lock, "wait_turn"):
                        # Sleep on a watch of the semaphore instead of a back-off: retry the moment a
                        # slot frees for us. The fallback bounds the wait if an event is ever missed.
                        # Jittered so the fallback re-reads of many waiters do not land together; the
                        # step (how often should_stop is checked) is at least 0.5 s: waking only
                        # to look costs CPU that the process's other waiters may need.
                        woke = self.lock.wait_turn(self.holder, random.uniform(0.5, 1) * self.watch_fallback,
                                                   should_stop, max(self.poll, 0.5))
                        if woke == "stopped":
                            self._stop_waiting()
                            self.state = "stopped"
                            return False
                        if woke != "lost":
                            continue
                    log.info("reboot slot not taken, retrying in %.0fs: %s", delay, exc)
                    if not self._nap(random.uniform(delay / 2, delay), should_stop):
                        self._stop_waiting()
                        return False
                    delay = min(delay * 2, self.retry_max)
                    continue
                self._stop_waiting(won=True)
                delay = self.retry_min
                self.last_error = None
                if not self.windows.is_open(self.clock()):
                    log.info("window closed while the lock was taken: giving the slot back until the next window")
                    self._release_quietly()
                    continue
            if not self._courtesy(should_stop):
                self._release_quietly()
                self.state = "stopped"
                return False
            if not self.windows.is_open(self.clock()):
                self._release_quietly()
                continue
            self.state = "rebooting"
            try:
                reboot()
            except BaseException:
                self._release_quietly()
                self.state = "reboot-failed"
                raise
            return True

    def _courtesy(self, should_stop: Callable[[], bool]) -> bool:
        users = self.users() if self.courtesy_delay > 0 else []
        if not users:
            return True
        mins = self.courtesy_delay / 60
        self.state = "courtesy-delay"
        self.wall(f"obelisk: an OS update is installed; this host reboots in {mins:.0f} minute(s). "
                  "Save your work and log out.")
        log.info("users logged in (%s): rebooting after %.0fs", ", ".join(users), self.courtesy_delay)
        return self._nap(self.courtesy_delay, should_stop)

    def status(self) -> dict[str, Any]:
        """For `obelisk update status --json`: where this host stands with its reboot."""
        now = self.clock()
        return {
            "strategy": self.strategy,
            "holder": self.holder or None,
            "group": getattr(self.lock, "group", None),
            "state": self.state,
            "last_error": self.last_error,
            "windows": self.windows.render() or None,
            "window_open": self.windows.is_open(now),
            "next_window": None if self.windows.always else self.windows.next_open(now).isoformat(),
        }

    def release_after_boot(self) -> None:
        """Give the slot back if this host holds one (no write if it does not); raises LockError
        after release_attempts failures so the caller can retry on its next run."""
        if self.lock is None:
            return
        delay = self.retry_min
        for attempt in range(self.release_attempts):
            try:
                if self.lock.unlock(self.holder):
                    log.info("reboot slot given back")
                self.state = "idle"
                return
            except LockError as exc:
                self.last_error = str(exc)
                if attempt == self.release_attempts - 1:
                    raise
                self.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self.retry_max)


def _strategy_of(update_conf: Any) -> str:
    if update_conf is None:
        return "reboot"
    if isinstance(update_conf, str):
        value = update_conf
    elif isinstance(update_conf, Mapping):
        value = update_conf.get("REBOOT_STRATEGY") or update_conf.get("reboot_strategy") or "reboot"
    else:
        value = getattr(update_conf, "reboot_strategy", None) or getattr(update_conf, "REBOOT_STRATEGY", None)
        value = value or "reboot"
    value = str(getattr(value, "value", value)).strip()
    if value not in STRATEGIES:
        raise StrategyError(f"REBOOT_STRATEGY {value!r} is unknown: use one of {', '.join(STRATEGIES)}")
    return value


def coordinator_from_config(update_conf: Any, lock_conf: LockConfig | None, *,
                            host_id: str | None = None) -> RebootCoordinator:
    """update_conf: the update.conf model (its reboot_strategy), a mapping or the strategy string;
    lock_conf: a LockConfig, or None to read /etc/obelisk/lock.conf over /usr/share/obelisk/lock.conf."""
    strategy = _strategy_of(update_conf)
    conf = lock_conf if lock_conf is not None else load()
    if strategy == "best-effort":
        strategy = "etcd-lock" if conf.endpoint else "reboot"
    windows = conf.windows()
    common = {"windows": windows, "courtesy_delay": conf.courtesy_delay.total_seconds()}
    if strategy in ("off", "reboot"):
        return RebootCoordinator(strategy, host_id or "", **common)
    holder = host_id or machine_host_id()
    backend: LockBackend
    if strategy == "etcd-lock":
        if not conf.endpoint:
            raise StrategyError("REBOOT_STRATEGY=etcd-lock needs ENDPOINT (etcd URLs) in lock.conf")
        endpoints = EtcdEndpoints(conf.endpoint, cafile=conf.cafile, certfile=conf.certfile, keyfile=conf.keyfile)
        backend = EtcdSemaphore(endpoints, conf.group, stale_after=conf.stale_after, queue=True)
    else:
        if not conf.fleetlock_url:
            raise StrategyError("REBOOT_STRATEGY=fleetlock needs FLEETLOCK_URL in lock.conf")
        backend = FleetLockClient(conf.fleetlock_url, conf.group, cafile=conf.cafile)
    return RebootCoordinator(strategy, holder, lock=backend, **common)
