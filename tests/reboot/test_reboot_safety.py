"""Safety and faults with real etcd: many hosts racing for k slots on one member and on a
3-member cluster; a member killed mid-run; quorum lost (nobody reboots) and regained."""

from __future__ import annotations

import threading
import time

import pytest
from fleetsim import FleetTimeout, Tracker, holders_history, run_fleet
from typer.testing import CliRunner

from update_engine.reboot.cli import app
from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore

pytestmark = pytest.mark.etcd

HOSTS = 50
SLOTS = 3
REBOOT = 0.03
FLEET_DEADLINE = 30.0  # a 50-host roll takes 1-3 s here; past this the fleet is stuck (no quorum), not slow


def check_fleet(etcd, group, results, tracker, hosts=HOSTS, slots=SLOTS) -> None:
    assert all(r.rebooted for r in results), [r for r in results if not r.rebooted][:3]
    assert all(r.released for r in results), [r for r in results if not r.released][:3]
    assert len(tracker.rebooted) == hosts
    assert tracker.peak <= slots  # never more than k hosts rebooting at once
    history = holders_history(etcd.endpoints, group)
    assert len(history) >= 2 * hosts  # one lock and one release per host (+ creation)
    assert all(n <= total for _, total, n in history), [h for h in history if h[2] > h[1]]
    assert max(n for _, _, n in history) > 1  # slots were actually held in parallel
    assert history[-1][2] == 0  # every slot was given back


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cluster", ["etcd1", "etcd3"])
def test_many_hosts_never_exceed_k_and_all_reboot(cluster, request, group) -> None:
    etcd = request.getfixturevalue(cluster)
    results, tracker = _fleet(etcd, group)
    check_fleet(etcd, group, results, tracker)


def _fleet(etcd, group, hosts=HOSTS, **kw):
    EtcdSemaphore(EtcdEndpoints(etcd.endpoints), group).set_max(SLOTS)
    return run_fleet(etcd.endpoints, group, hosts, REBOOT, deadline=FLEET_DEADLINE, **kw)


@pytest.mark.timeout(60)  # cluster start + a 30 s fleet deadline + slack: a lost quorum fails, never hangs
def test_one_member_killed_mid_run_locking_continues(etcd3, group) -> None:
    tracker = Tracker()

    def killer() -> None:
        deadline = time.monotonic() + FLEET_DEADLINE
        while len(tracker.rebooted) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        etcd3.members[0].kill()  # the first endpoint every client prefers

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    results, tracker = _fleet(etcd3, group, tracker=tracker)
    t.join(5)
    assert not etcd3.members[0].alive
    check_fleet(etcd3, group, results, tracker)


@pytest.mark.timeout(90)
def test_quorum_lost_nobody_reboots_then_locking_resumes(etcd3, group) -> None:
    EtcdSemaphore(EtcdEndpoints(etcd3.endpoints), group).set_max(SLOTS)
    etcd3.members[1].kill()
    etcd3.members[2].kill()
    deadline = time.monotonic() + 4
    results, tracker = run_fleet(etcd3.endpoints, group, 10, REBOOT, should_stop=lambda: time.monotonic() > deadline,
                                 timeout=0.5, deadline=FLEET_DEADLINE)
    assert not any(r.rebooted for r in results) and not tracker.rebooted  # fail safe
    errors = {r.last_error for r in results}
    assert all(e and e.startswith("etcd unavailable (no member answered or the cluster has no quorum)") for e in errors)
    r = CliRunner().invoke(app, ["status", "--endpoint", etcd3.endpoints, "--group", group])
    assert r.exit_code == 2 and r.output.startswith("error: etcd unavailable") and len(r.output.splitlines()) == 1
    etcd3.restart(etcd3.members[1])  # two of three: quorum is back
    results, tracker = run_fleet(etcd3.endpoints, group, 10, REBOOT, deadline=FLEET_DEADLINE)
    assert all(r.rebooted for r in results)
    assert tracker.peak <= SLOTS


@pytest.mark.timeout(60)
def test_fleet_without_quorum_fails_fast_with_a_message(etcd3, group) -> None:
    """What a 3-member cluster started with 2 members did once (two members on one port), then
    one killed: no quorum, and 50 hosts retried for over 10 minutes. Now the run's deadline ends it."""
    EtcdSemaphore(EtcdEndpoints(etcd3.endpoints), group).set_max(SLOTS)
    etcd3.members[0].kill()
    etcd3.members[1].kill()
    t = time.monotonic()
    with pytest.raises(FleetTimeout, match=r"fleet of 50 did not finish in 5s: 50 host\(s\).*etcd unavailable"):
        run_fleet(etcd3.endpoints, group, HOSTS, REBOOT, timeout=0.5, deadline=5)
    assert time.monotonic() - t < 5 + 15  # the deadline, plus the grace for calls under way
