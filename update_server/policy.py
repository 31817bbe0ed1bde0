"""Rollout policy per group and the pure decision whether one instance gets an update now.

`decide(instance, state, policy, now)` is a pure function of its arguments (time is injected as
epoch seconds), so the Omaha handler, the preview and the tests all ask the same question. The
database-side guard (`Store.grant`) reads a fresh `GroupState` under the group's row lock, calls
`decide`, and records the start in the same transaction, so the rate holds across replicas.

What a policy can say (Nebraska's group policy, plus waves, soak, floors and halt on failure):
- ``updates_enabled``: off = nobody starts an update (Nebraska's policy_updates_enabled).
- ``max_updates_per_period`` / ``period``: at most N updates *started* in any sliding period
  (Nebraska counts grants in the last period_interval; so do we).
- ``windows`` / ``timezone``: weekly windows (`Mon..Fri 09:00 8h; Sat 04:00 4h`) in which updates
  may start; none = always. Nebraska hard-codes Mon-Fri 09:00-17:00 ("office hours").
- ``waves``: [[after, percent], ...]: `after` since the rollout started, `percent` of the group's
  seeds may start (Bottlerocket: seeds 0..2047, each wave includes the earlier ones).
- ``soak``: a release becomes eligible only this long after the server first saw it.
- ``safe_mode``: the first host of a release goes alone; the rest wait for its success.
- ``retry_after``: a host whose update failed is offered the same version again only this much later.
- ``halt_failure_share`` / ``halt_window`` / ``update_timeout``: when the failed attempts (error
  events, rollbacks with code 44, attempts not finished within the timeout) among the last
  `halt_window` finished attempts reach the share, the group halts until an operator resumes it.
  The share is of the whole window (failed / halt_window), so a bad release is stopped after
  ceil(share * window) failures even before the window has filled.
Floors (mandatory intermediate versions) belong to the channel; `next_version` walks them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from obelisk.errors import ObeliskError
from obelisk.versions import compare_versions, is_version
from obelisk.windows import WindowError, WindowSet, format_duration, parse_duration

SEEDS = 2048  # Bottlerocket's seed space: a wave's share maps onto seeds 0..2047
MAX_PERIOD = timedelta(days=366)
MAX_HALT_WINDOW = 10_000


class PolicyError(ObeliskError, ValueError):
    """A rollout policy value is malformed or out of range; the message names the field."""


def seed_of(machine_id: str) -> int:
    """A stable seed in [0, SEEDS) from the machine id: the same host is always in the same wave."""
    digest = hashlib.sha256(b"obelisk-wave\0" + machine_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % SEEDS


def _duration(name: str, value: Any, *, allow_zero: bool) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"policy {name}: expected a duration string such as '1h' or '90m', got {value!r}")
    try:
        d = parse_duration(value)
    except WindowError as exc:
        raise PolicyError(f"policy {name}: {exc}") from None
    if d < timedelta(0) or (d == timedelta(0) and not allow_zero) or d > MAX_PERIOD:
        low = "at least 0s" if allow_zero else "more than 0s"
        raise PolicyError(f"policy {name}: {value!r} must be {low} and at most 366d")
    return format_duration(d)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"policy {name}: expected true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class Wave:
    after: str    # duration since the rollout started
    percent: float  # share of the group's seeds, 0 < percent <= 100

    @property
    def after_s(self) -> float:
        return parse_duration(self.after).total_seconds()

    @property
    def seeds(self) -> int:
        """Seeds below this number may start once the wave is open."""
        return min(SEEDS, math.ceil(self.percent * SEEDS / 100))


@dataclass(frozen=True)
class Policy:
    updates_enabled: bool = True
    max_updates_per_period: int | None = None  # None: no limit
    period: str = "1h"
    windows: str = ""
    timezone: str = "UTC"
    waves: tuple[Wave, ...] = ()
    soak: str = "0s"
    safe_mode: bool = False
    update_timeout: str = "2h"
    retry_after: str = "1h"  # a host whose update to V failed is offered V again only this much later
    halt_failure_share: float | None = None  # None: never halt by itself
    halt_window: int = 20

    # ---------------------------------------------------------------- parsing

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        """Validate a whole policy (JSON object); unknown keys and bad values raise PolicyError."""
        if not isinstance(data, dict):
            raise PolicyError(f"policy: expected a JSON object, got {type(data).__name__}")
        return cls().updated(data)

    def updated(self, changes: dict[str, Any]) -> Policy:
        """A copy with ``changes`` applied; all of it is checked before anything is returned."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise PolicyError(f"policy: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for key, value in changes.items():
            values[key] = _FIELD_CHECKS[key](value)
        out = replace(self, **values)
        out._check_together()
        return out

    def _check_together(self) -> None:
        try:
            WindowSet.parse(self.windows, self.timezone)
        except WindowError as exc:
            raise PolicyError(f"policy windows/timezone: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["waves"] = [[w.after, w.percent] for w in self.waves]
        return d

    # ---------------------------------------------------------------- derived values

    @property
    def period_s(self) -> float:
        return parse_duration(self.period).total_seconds()

    @property
    def soak_s(self) -> float:
        return parse_duration(self.soak).total_seconds()

    @property
    def retry_s(self) -> float:
        return parse_duration(self.retry_after).total_seconds()

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.update_timeout).total_seconds()

    def window_set(self) -> WindowSet:
        return WindowSet.parse(self.windows, self.timezone)

    def wave_open_at(self, seed: int, rollout_start: float) -> float | None:
        """When the first wave that includes this seed opens; None if no wave ever does."""
        if not self.waves:
            return rollout_start
        for w in self.waves:  # sorted by `after`, shares never shrink
            if seed < w.seeds:
                return rollout_start + w.after_s
        return None

    def halt_threshold(self) -> int | None:
        """Failed attempts among the last `halt_window` finished ones that halt the group."""
        if self.halt_failure_share is None:
            return None
        return max(1, math.ceil(self.halt_failure_share * self.halt_window - 1e-9))


def _check_int_limit(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 1_000_000_000:
        raise PolicyError(f"policy max_updates_per_period: expected a whole number of at least 1 "
                          f"(or null for no limit), got {value!r}")
    return value


def _check_text(name: str, limit: int):
    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > limit or any(ord(c) < 32 for c in value):
            raise PolicyError(f"policy {name}: expected a single-line string of at most {limit} characters")
        return value
    return check


def _check_waves(value: Any) -> tuple[Wave, ...]:
    if not isinstance(value, list | tuple) or len(value) > 100:
        raise PolicyError("policy waves: expected a list of [after, percent] pairs, e.g. [['1h', 1], ['1d', 100]]")
    out: list[Wave] = []
    for i, item in enumerate(value):
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise PolicyError(f"policy waves[{i}]: expected [after, percent], got {item!r}")
        after = _duration(f"waves[{i}] after", item[0], allow_zero=True)
        pct = item[1]
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not (0 < pct <= 100) or pct != pct:
            raise PolicyError(f"policy waves[{i}] percent: expected a number above 0 and at most 100, got {pct!r}")
        wave = Wave(after, float(pct))
        if out and wave.after_s <= out[-1].after_s:
            raise PolicyError(f"policy waves[{i}]: 'after' must grow from wave to wave ({item[0]!r} is not "
                              f"later than {out[-1].after!r})")
        if out and wave.percent < out[-1].percent:
            raise PolicyError(f"policy waves[{i}]: a wave's percent may not shrink ({pct} after {out[-1].percent})")
        out.append(wave)
    return tuple(out)


def _check_share(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value <= 1):
        raise PolicyError(f"policy halt_failure_share: expected a share above 0 and at most 1 (0.2 = 20%), "
                          f"or null to never halt, got {value!r}")
    return float(value)


def _check_window(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= MAX_HALT_WINDOW):
        raise PolicyError(f"policy halt_window: expected a whole number from 1 to {MAX_HALT_WINDOW}, got {value!r}")
    return value


_FIELD_CHECKS = {
    "updates_enabled": lambda v: _bool("updates_enabled", v),
    "max_updates_per_period": _check_int_limit,
    "period": lambda v: _duration("period", v, allow_zero=False),
    "windows": _check_text("windows", 1000),
    "timezone": _check_text("timezone", 64),
    "waves": _check_waves,
    "soak": lambda v: _duration("soak", v, allow_zero=True),
    "safe_mode": lambda v: _bool("safe_mode", v),
    "update_timeout": lambda v: _duration("update_timeout", v, allow_zero=False),
    "retry_after": lambda v: _duration("retry_after", v, allow_zero=True),
    "halt_failure_share": _check_share,
    "halt_window": _check_window,
}


# ---------------------------------------------------------------- floors


def parse_floors(value: Any) -> tuple[str, ...]:
    """A channel's mandatory intermediate versions, sorted; each must be a version."""
    if not isinstance(value, list | tuple) or len(value) > 1000:
        raise PolicyError("floors: expected a list of versions, e.g. ['1.2.0', '1.5.0']")
    for v in value:
        if not isinstance(v, str) or len(v) > 64 or not is_version(v):
            raise PolicyError(f"floors: {v!r} is not a version (expected e.g. 1.2.0)")
    out: list[str] = []
    for v in sorted(value, key=_VersionKey):
        if not out or compare_versions(out[-1], v) != 0:
            out.append(v)
    return tuple(out)


class _VersionKey:
    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _VersionKey) -> bool:
        return compare_versions(self.v, other.v) < 0


def next_version(current: str, target: str, floors: tuple[str, ...] = ()) -> str:
    """The version a host on `current` is offered: the first floor above it and below `target`, else `target`."""
    for f in floors:
        if compare_versions(f, current) > 0 and compare_versions(f, target) < 0:
            return f
    return target


# ---------------------------------------------------------------- the decision


@dataclass(frozen=True)
class InstanceView:
    machine_id: str
    version: str
    pending_version: str | None = None  # version of its update in progress (granted, not finished)
    failed_version: str | None = None   # version of its last attempt, when that attempt failed
    failed_at: float | None = None

    @property
    def seed(self) -> int:
        return seed_of(self.machine_id)


@dataclass(frozen=True)
class GroupState:
    """What the policy needs to know about a group at one moment (read under the group's lock)."""

    name: str
    target: str | None                   # the channel's release for this instance's app and arch
    floors: tuple[str, ...] = ()
    published_at: float | None = None    # when the server first saw `target`
    channel_set_at: float = 0.0          # when an operator last pointed the channel
    paused: bool = False
    halted: bool = False
    halt_reason: str = ""
    started_in_period: int = 0           # attempts started in (now - period, now]
    oldest_in_period: float | None = None
    canary: str = "none"                 # for the offered version: none | pending | succeeded | failed
    canary_id: str = ""


@dataclass(frozen=True)
class Decision:
    offer: bool
    code: str              # offer | resume | up_to_date | no_release | disabled | paused | halted | retry_later
    reason: str            # | soak | wave | window | safe_mode | rate: one line for the console and the log
    version: str | None = None      # what is (or would be) offered
    retry_at: float | None = None   # earliest time the answer may change by itself (None: needs an event)
    new_start: bool = False         # True when this offer starts a new attempt (counts against the rate)


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def rollout_start(state: GroupState, policy: Policy) -> float:
    """Waves count from when the release became eligible: published + soak, or the channel's move if later."""
    published = state.published_at if state.published_at is not None else state.channel_set_at
    return max(published + policy.soak_s, state.channel_set_at)


def decide(instance: InstanceView, state: GroupState, policy: Policy, now: float) -> Decision:
    """Whether `instance` may start (or continue) an update at `now` under `policy`. Pure."""
    if state.target is None:
        return Decision(False, "no_release", f"group {state.name} has no release for this host")
    if compare_versions(instance.version, state.target) >= 0:
        return Decision(False, "up_to_date", f"already on {instance.version}")
    version = next_version(instance.version, state.target, state.floors)
    hold = _switches(state, policy, version)
    if hold is not None:
        return hold
    if instance.pending_version is not None and compare_versions(instance.pending_version, version) == 0:
        return Decision(True, "resume", f"update to {version} already started", version)
    if (instance.failed_version is not None and instance.failed_at is not None
            and compare_versions(instance.failed_version, version) == 0 and now < instance.failed_at + policy.retry_s):
        again = instance.failed_at + policy.retry_s
        return Decision(False, "retry_later", f"the update to {version} failed here; offered again at {_ts(again)}",
                        version, again)
    return _gates(instance, state, policy, now, version)


def _switches(state: GroupState, policy: Policy, version: str) -> Decision | None:
    if not policy.updates_enabled:
        return Decision(False, "disabled", f"updates are disabled for group {state.name}", version)
    if state.halted:
        return Decision(False, "halted", state.halt_reason or f"rollout of group {state.name} is halted", version)
    if state.paused:
        return Decision(False, "paused", f"rollout of group {state.name} is paused", version)
    return None


def _gates(instance: InstanceView, state: GroupState, policy: Policy, now: float, version: str) -> Decision:
    published = state.published_at if state.published_at is not None else now
    eligible = published + policy.soak_s
    if policy.soak_s > 0 and now < eligible:
        return Decision(False, "soak", f"{state.target} soaks until {_ts(eligible)}", version, eligible)
    opens = policy.wave_open_at(instance.seed, rollout_start(state, policy))
    if opens is None:
        return Decision(False, "wave", f"no wave includes seed {instance.seed}", version)
    if now < opens:
        return Decision(False, "wave", f"seed {instance.seed}'s wave opens at {_ts(opens)}", version, opens)
    ws = policy.window_set()
    if not ws.is_open(datetime.fromtimestamp(now, UTC)):
        nxt = ws.next_open(datetime.fromtimestamp(now, UTC)).timestamp()
        return Decision(False, "window", f"outside the update windows ({policy.windows}); next opens at {_ts(nxt)}",
                        version, nxt)
    if policy.safe_mode and state.canary != "succeeded":
        if state.canary == "pending":
            return Decision(False, "safe_mode", f"safe mode: waiting for the first host {state.canary_id} to "
                                                f"finish {version}", version)
        if state.canary == "failed":
            return Decision(False, "safe_mode", f"safe mode: the first host {state.canary_id} failed {version}",
                            version)
    limit = policy.max_updates_per_period
    if limit is not None and state.started_in_period >= limit:
        retry = (state.oldest_in_period + policy.period_s) if state.oldest_in_period is not None else None
        return Decision(False, "rate", f"{state.started_in_period} updates started in the last {policy.period} "
                                       f"(limit {limit})", version, retry)
    return Decision(True, "offer", f"update to {version}", version, new_start=True)


@dataclass
class Attempt:
    """One finished or pending update, as the halt check sees it."""

    machine_id: str
    outcome: str  # success | failed | timeout | pending
    error_code: int | None = None
    reason: str = ""


def halt_reason(finished: list[Attempt], policy: Policy) -> str | None:
    """The reason to halt when the failures among the last finished attempts reach the policy's share, else None.

    `finished` is newest first and holds at most `policy.halt_window` attempts.
    """
    need = policy.halt_threshold()
    if need is None:
        return None
    window = finished[:policy.halt_window]
    failed = [a for a in window if a.outcome in ("failed", "timeout")]
    if len(failed) < need:
        return None
    share = policy.halt_failure_share or 0
    names = ", ".join(_describe(a) for a in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    return (f"halted: {len(failed)} of the last {policy.halt_window} updates failed (threshold {share:.0%}): "
            f"{names}; resume with 'obelisk fleet rollout resume'")


def _describe(a: Attempt) -> str:
    if a.outcome == "timeout":
        return f"{a.machine_id} (did not finish in time)"
    if a.error_code == 44:
        return f"{a.machine_id} (rolled back, code 44)"
    text = f": {a.reason[:80]}" if a.reason else ""
    return f"{a.machine_id} (error {a.error_code}{text})"


@dataclass
class PlanEntry:
    machine_id: str
    seed: int
    version: str | None
    at: float | None      # when it would start; None: not by itself (needs an operator or never)
    reason: str           # why then (or why not)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(instances: list[InstanceView], state: GroupState, policy: Policy, now: float, *, step: float = 0.0,
         started: tuple[float, ...] = (), horizon: float = 90 * 86400.0) -> list[PlanEntry]:
    """When each instance would start its update, if every host checked in every `step` seconds from `now`.

    Uses the same gates as `decide` (soak, waves, windows, rate, safe mode), in closed form: each host's
    earliest eligible time, then rate slots handed out in (eligible time, seed, machine id) order,
    which is the order hosts checking in on that grid in seed order would take them. `started`: the
    group's start times already in the current period. Safe mode assumes the first host succeeds by
    its next check-in (the others follow from the check-in after). Hosts held by a switch (disabled,
    paused, halted) or by no wave get `at=None`.
    """
    ws = policy.window_set()
    out: dict[str, PlanEntry] = {}
    queue: list[tuple[float, int, str, str]] = []
    for inst in instances:
        d = decide(inst, replace(state, started_in_period=0, canary="succeeded"), policy, now)
        seed = inst.seed
        if d.code in ("up_to_date", "no_release", "disabled", "paused", "halted") or d.code == "resume":
            out[inst.machine_id] = PlanEntry(inst.machine_id, seed, d.version, now if d.code == "resume" else None,
                                             d.reason)
            continue
        e = _eligible(inst, state, policy, now, d)
        if e is None:
            out[inst.machine_id] = PlanEntry(inst.machine_id, seed, d.version, None, d.reason)
            continue
        # The first check-in at which only the rate could hold it back: hosts are served in this order.
        e = _grid(_open_at(ws, _grid(e, now, step)), now, step)
        queue.append((e, seed, inst.machine_id, d.version or ""))
    queue.sort()
    starts = sorted(started)
    limit, period = policy.max_updates_per_period, policy.period_s
    canary_at: float | None = None
    for e, seed, mid, version in queue:
        t = _grid(max(e, now), now, step)
        for _ in range(10_000):  # each round only moves t later; bounded for safety
            t2 = t
            if limit is not None:
                recent = [s for s in starts if s > t2 - period]
                if len(recent) >= limit:
                    t2 = _grid(recent[-limit] + period, now, step)
            if policy.safe_mode and canary_at is not None and t2 <= canary_at:
                t2 = _grid(canary_at + max(step, 1e-6), now, step)
            t2 = _grid(_open_at(ws, t2), now, step)
            if t2 == t:
                break
            t = t2
        if t > now + horizon:
            out[mid] = PlanEntry(mid, seed, version, None, f"not within {horizon / 86400:.0f} days")
            continue
        starts.append(t)
        starts.sort()
        first = canary_at is None
        if first:
            canary_at = t
        out[mid] = PlanEntry(mid, seed, version, t, "first host (safe mode)" if policy.safe_mode and first
                             else "eligible")
    return [out[i.machine_id] for i in instances]


def _eligible(inst: InstanceView, state: GroupState, policy: Policy, now: float, d: Decision) -> float | None:
    """Earliest time soak, wave and retry allow (windows are applied by the caller)."""
    published = state.published_at if state.published_at is not None else now
    e = max(now, published + policy.soak_s)
    opens = policy.wave_open_at(inst.seed, rollout_start(state, policy))
    if opens is None:
        return None
    e = max(e, opens)
    if d.code == "retry_later" and d.retry_at is not None:
        e = max(e, d.retry_at)
    return e


def _grid(t: float, start: float, step: float) -> float:
    """`t` rounded up to the next check-in time start + k*step (t itself when step is 0)."""
    if step <= 0 or t <= start:
        return max(t, start)
    return start + math.ceil((t - start) / step - 1e-9) * step


def _open_at(ws: WindowSet, t: float) -> float:
    if ws.always:
        return t
    return ws.next_open(datetime.fromtimestamp(t, UTC)).timestamp()
