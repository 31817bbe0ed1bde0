"""RebootCoordinator over a real etcd semaphore: windows (checked before and after the lock),
the courtesy delay with its wall message, stopping, and release after boot.

Time is a test clock advanced by the coordinator's own sleep (days of windows pass in
milliseconds); the lock, etcd and the semaphore are real.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from obelisk.lock_conf import LockConfig
from update_engine.reboot import RebootCoordinator, coordinator_from_config
from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore

pytestmark = pytest.mark.etcd
FRIDAY_10 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make(etcd1, group, clock, window="Sat 04:00 1h", sem=None, **kw) -> RebootCoordinator:
    conf = LockConfig(endpoint=[etcd1.endpoints], group=group, window=window)
    c = coordinator_from_config("etcd-lock", conf, host_id="host-a")
    if sem is not None:
        c.lock = sem
    c.clock, c.sleep, c.poll = clock, clock.sleep, 60.0
    c.users = kw.get("users", lambda: [])
    c.wall = kw.get("wall", lambda msg: None)
    return c


def holders(etcd1, group) -> list[str]:
    return EtcdSemaphore(EtcdEndpoints(etcd1.endpoints), group).read().holders


def test_waits_for_the_window_then_locks_and_reboots(etcd1, group) -> None:
    clock = Clock(FRIDAY_10)
    c = make(etcd1, group, clock)
    seen = []
    assert c.wait_and_reboot(lambda: seen.append((clock(), holders(etcd1, group))), lambda: False)
    when, held = seen[0]
    assert datetime(2026, 11, 28, 4, 0, tzinfo=UTC) <= when < datetime(2026, 11, 28, 5, 0, tzinfo=UTC)
    assert held == ["host-a"]  # the slot is held across the reboot
    st = c.status()
    assert st["strategy"] == "etcd-lock" and st["state"] == "rebooting" and st["group"] == group
    assert st["windows"] == "Sat 04:00 1h"
    c.release_after_boot()
    assert holders(etcd1, group) == []
    c.release_after_boot()  # nothing held: no error, no write


def test_window_closing_while_waiting_for_the_lock_gives_the_slot_back(etcd1, group) -> None:
    clock = Clock(FRIDAY_10)
    calls = []

    class SlowFirstLock(EtcdSemaphore):
        def lock(self, holder):
            state = super().lock(holder)
            calls.append(clock())
            if len(calls) == 1:
                clock.sleep(2 * 3600)  # the lock was won only after the window had closed
            return state

    sem = SlowFirstLock(EtcdEndpoints(etcd1.endpoints), group)
    c = make(etcd1, group, clock, sem=sem)
    seen = []
    assert c.wait_and_reboot(lambda: seen.append((clock(), holders(etcd1, group))), lambda: False)
    assert len(calls) == 2
    assert calls[1] - calls[0] > timedelta(days=6)  # waited for next week's window
    when, held = seen[0]
    assert c.windows.is_open(when) and held == ["host-a"]
    c.release_after_boot()


def test_courtesy_delay_walls_logged_in_users(etcd1, group) -> None:
    clock = Clock(datetime(2026, 11, 28, 4, 0, tzinfo=UTC))
    walls = []
    c = make(etcd1, group, clock, window="Sat 04:00 1h", users=lambda: ["alice"], wall=walls.append)
    c.courtesy_delay = 300
    rebooted = []
    assert c.wait_and_reboot(lambda: rebooted.append(clock()), lambda: False)
    assert len(walls) == 1 and "reboots in 5 minute(s)" in walls[0]
    assert rebooted[0] - datetime(2026, 11, 28, 4, 0, tzinfo=UTC) >= timedelta(seconds=300)
    c.release_after_boot()
    # stopped during the courtesy delay: no reboot, and the slot is given back
    clock.now = datetime(2026, 12, 5, 4, 0, tzinfo=UTC)
    stop_at = clock.now + timedelta(seconds=100)
    assert not c.wait_and_reboot(lambda: pytest.fail("rebooted"), lambda: clock() >= stop_at)
    assert holders(etcd1, group) == []


def test_failed_reboot_gives_the_slot_back_and_strategy_reboot_needs_no_lock(etcd1, group) -> None:
    clock = Clock(datetime(2026, 11, 28, 4, 0, tzinfo=UTC))
    c = make(etcd1, group, clock)

    def boom() -> None:
        raise RuntimeError("systemctl reboot failed")

    with pytest.raises(RuntimeError):
        c.wait_and_reboot(boom, lambda: False)
    assert holders(etcd1, group) == []
    r = coordinator_from_config("reboot", LockConfig(), host_id="h")
    assert r.lock is None and r.wait_and_reboot(lambda: None, lambda: False)
    r.release_after_boot()
