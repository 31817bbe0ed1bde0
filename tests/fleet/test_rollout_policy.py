"""The pure decision: windows and soak at their edges, wave shares against Bottlerocket's schedule, floors.

No database here: `decide` is a pure function of (instance, state, policy, now), so edges are
checked to the second with injected time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from fleet_helpers import machine_ids

from update_server.policy import (
    SEEDS,
    Attempt,
    GroupState,
    InstanceView,
    Policy,
    decide,
    halt_reason,
    next_version,
    parse_floors,
    seed_of,
)

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC).timestamp()  # a Monday
BOTTLEROCKET = [["1h", 1], ["4h", 5], ["1d", 10], ["3d", 25], ["6d", 100]]  # its default waves


def state(**kw) -> GroupState:  # noqa: ANN003
    base = {"name": "prod", "target": "2.0.0", "published_at": T0}
    return GroupState(**{**base, **kw})


def inst(mid: str = "a" * 32, version: str = "1.0.0", **kw) -> InstanceView:  # noqa: ANN003
    return InstanceView(mid, version, **kw)


def local(tz: str, *args: int) -> float:
    return datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()


def test_no_policy_offers_at_once() -> None:
    d = decide(inst(), state(), Policy(), T0)
    assert d.offer and d.code == "offer" and d.version == "2.0.0" and d.new_start


def test_up_to_date_and_no_release() -> None:
    assert decide(inst(version="2.0.0"), state(), Policy(), T0).code == "up_to_date"
    assert decide(inst(version="2.1.0"), state(), Policy(), T0).code == "up_to_date"  # never a downgrade
    assert decide(inst(), state(target=None), Policy(), T0).code == "no_release"


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York", "UTC", "Asia/Kolkata"])
def test_window_edges_in_the_groups_time_zone(tz: str) -> None:
    p = Policy.from_dict({"windows": "Mon..Fri 09:00 8h", "timezone": tz})
    wed = (2026, 3, 4)
    assert decide(inst(), state(), p, local(tz, *wed, 8, 59, 59)).code == "window"
    assert decide(inst(), state(), p, local(tz, *wed, 9, 0, 0)).offer
    assert decide(inst(), state(), p, local(tz, *wed, 16, 59, 59)).offer
    closed = decide(inst(), state(), p, local(tz, *wed, 17, 0, 0))
    assert closed.code == "window" and closed.retry_at == local(tz, 2026, 3, 5, 9, 0, 0)
    sat = decide(inst(), state(), p, local(tz, 2026, 3, 7, 12, 0, 0))
    assert sat.code == "window" and sat.retry_at == local(tz, 2026, 3, 9, 9, 0, 0)  # next Monday


def test_window_across_a_dst_change_keeps_local_time() -> None:
    p = Policy.from_dict({"windows": "Sun 02:30 1h; Mon..Fri 09:00 1h", "timezone": "Europe/Berlin"})
    # 2026-03-30 is the Monday after Berlin's switch to summer time: 09:00 local is 07:00Z.
    assert decide(inst(), state(), p, datetime(2026, 3, 30, 7, 0, tzinfo=UTC).timestamp()).offer
    assert decide(inst(), state(), p, datetime(2026, 3, 30, 6, 59, 59, tzinfo=UTC).timestamp()).code == "window"


def test_soak_edges() -> None:
    p = Policy.from_dict({"soak": "6h"})
    before = decide(inst(), state(), p, T0 + 6 * 3600 - 1)
    assert before.code == "soak" and before.retry_at == T0 + 6 * 3600
    assert decide(inst(), state(), p, T0 + 6 * 3600).offer


@pytest.mark.parametrize("n", [1000])
def test_wave_shares_match_the_schedule(n: int) -> None:
    """Shares of 1000 hosts within 3 percentage points of the schedule (binomial 3 sigma at 25% is 4.1)."""
    p = Policy.from_dict({"waves": BOTTLEROCKET})
    ids = machine_ids(n, "wave")
    checkpoints = [(0, 0), (3599, 0), (3600, 1), (4 * 3600 - 1, 1), (4 * 3600, 5), (86400, 10), (3 * 86400, 25),
                   (6 * 86400 - 1, 25), (6 * 86400, 100)]
    for dt, want in checkpoints:
        got = sum(decide(inst(mid), state(), p, T0 + dt).offer for mid in ids) / n * 100
        assert abs(got - want) <= 3.0, (dt, want, got)
        if want in (0, 100):
            assert got == want
    # Waves include the earlier ones: a host in the 1% wave is in every later wave.
    early = {mid for mid in ids if decide(inst(mid), state(), p, T0 + 3600).offer}
    for dt in (4 * 3600, 86400, 3 * 86400):
        assert early <= {mid for mid in ids if decide(inst(mid), state(), p, T0 + dt).offer}


def test_wave_edge_for_one_host_and_its_retry_time() -> None:
    p = Policy.from_dict({"waves": [["2h", 50], ["5h", 100]]})
    mid = next(m for m in machine_ids(100, "edge") if seed_of(m) >= SEEDS // 2)  # only in the second wave
    held = decide(inst(mid), state(), p, T0 + 5 * 3600 - 1)
    assert held.code == "wave" and held.retry_at == T0 + 5 * 3600
    assert decide(inst(mid), state(), p, T0 + 5 * 3600).offer


def test_waves_start_after_soak_and_after_the_channel_moved() -> None:
    p = Policy.from_dict({"waves": [["1h", 100]], "soak": "2h"})
    assert decide(inst(), state(), p, T0 + 3 * 3600 - 1).code == "wave"
    assert decide(inst(), state(), p, T0 + 3 * 3600).offer
    moved = state(channel_set_at=T0 + 10 * 3600)  # an operator pointed the channel later
    assert decide(inst(), moved, p, T0 + 11 * 3600 - 1).code == "wave"
    assert decide(inst(), moved, p, T0 + 11 * 3600).offer


def test_seeds_are_stable_and_spread() -> None:
    ids = machine_ids(4096, "spread")
    seeds = [seed_of(m) for m in ids]
    assert seeds == [seed_of(m) for m in ids]
    assert all(0 <= s < SEEDS for s in seeds)
    quarter = sum(s < SEEDS // 4 for s in seeds) / len(seeds)
    assert 0.22 < quarter < 0.28


def test_switches_come_first_and_resume_bypasses_gates() -> None:
    p = Policy.from_dict({"max_updates_per_period": 1, "windows": "Sat 00:00 1h"})
    assert decide(inst(), state(), Policy(updates_enabled=False), T0).code == "disabled"
    assert decide(inst(), state(paused=True), Policy(), T0).code == "paused"
    h = decide(inst(), state(halted=True, halt_reason="halted: 3 of 10"), Policy(), T0)
    assert h.code == "halted" and h.reason == "halted: 3 of 10"
    # Already granted and not finished: offered again, outside the window and over the rate, not a new start.
    r = decide(inst(pending_version="2.0.0"), state(started_in_period=5), p, T0)
    assert r.offer and r.code == "resume" and not r.new_start
    assert decide(inst(pending_version="2.0.0"), state(paused=True), p, T0).code == "paused"


def test_rate_limit_and_its_retry_time() -> None:
    p = Policy.from_dict({"max_updates_per_period": 3, "period": "1h"})
    assert decide(inst(), state(started_in_period=2, oldest_in_period=T0 - 100), p, T0).offer
    d = decide(inst(), state(started_in_period=3, oldest_in_period=T0 - 100), p, T0)
    assert d.code == "rate" and d.retry_at == T0 - 100 + 3600


def test_safe_mode_states() -> None:
    p = Policy(safe_mode=True)
    assert decide(inst(), state(canary="none"), p, T0).offer
    assert decide(inst(), state(canary="pending", canary_id="m1"), p, T0).code == "safe_mode"
    assert decide(inst(), state(canary="failed", canary_id="m1"), p, T0).code == "safe_mode"
    assert decide(inst(), state(canary="succeeded"), p, T0).offer


def test_floors_in_order() -> None:
    floors = parse_floors(["1.5.0", "1.2.0", "1.5.0", "2.0.0"])
    assert floors == ("1.2.0", "1.5.0", "2.0.0")
    assert next_version("1.0.0", "3.0.0", floors) == "1.2.0"
    assert next_version("1.2.0", "3.0.0", floors) == "1.5.0"
    assert next_version("1.9.0", "3.0.0", floors) == "2.0.0"
    assert next_version("2.0.0", "3.0.0", floors) == "3.0.0"
    assert next_version("1.0.0", "1.4.0", floors) == "1.2.0"
    assert next_version("1.2.0", "1.4.0", floors) == "1.4.0"  # a floor past the target is not offered
    d = decide(inst(version="1.0.0"), state(target="3.0.0", floors=floors), Policy(), T0)
    assert d.offer and d.version == "1.2.0"


@pytest.mark.parametrize("share,window,halts_at", [(0.3, 10, 3), (0.2, 20, 4), (0.5, 4, 2), (1.0, 3, 3),
                                                   (0.01, 20, 1), (0.25, 10, 3)])
def test_halt_triggers_at_the_share_and_not_before(share: float, window: int, halts_at: int) -> None:
    p = Policy.from_dict({"halt_failure_share": share, "halt_window": window})
    ok = [Attempt(f"ok{i}", "success") for i in range(window)]
    for failed in range(window + 1):
        finished = [Attempt(f"bad{i}", "failed", 10, "hash mismatch") for i in range(failed)] + ok
        why = halt_reason(finished[:window], p)
        assert (why is not None) == (failed >= halts_at), (failed, why)
    why = halt_reason([Attempt("m1", "failed", 44), Attempt("m2", "timeout"), Attempt("m3", "failed", 10, "bad")]
                      + ok, Policy.from_dict({"halt_failure_share": 0.3, "halt_window": 10}))
    assert why and "m1 (rolled back, code 44)" in why and "m2 (did not finish in time)" in why
    assert "m3 (error 10: bad)" in why and "3 of the last 10" in why


def test_halt_off_by_default() -> None:
    assert halt_reason([Attempt("m", "failed", 10)] * 20, Policy()) is None
