"""The fleet store: one SQLAlchemy engine over SQLite or PostgreSQL, migrated at open.

`Store(url)` applies the shipped Alembic migrations (no alembic.ini on disk: the script folder is
this package's ``migrations``) and refuses a database whose revision this code does not know (a
newer server migrated it). Every write runs in one transaction; `grant` is the rollout guard:
it locks the group's `rollout_state` row (an UPDATE, so PostgreSQL serialises concurrent grants
across server processes and SQLite takes its write lock), reads the counts, asks
`policy.decide`, and records the new attempt before the lock is released.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite  # noqa: F401 - the upsert constructs of both dialects
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from obelisk.errors import ObeliskError
from obelisk.versions import compare_versions, is_version
from update_server.db import models as m
from update_server.policy import (
    Attempt,
    Decision,
    GroupState,
    InstanceView,
    PlanEntry,
    Policy,
    PolicyError,
    decide,
    halt_reason,
    next_version,
    parse_floors,
    plan,
)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DB_FILE = "fleet.sqlite"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # groups and channels (FleetLock's group charset)


class FleetStoreError(ObeliskError, ValueError):
    """The database cannot be used (unknown schema, bad URL, unreachable); one line saying what to do."""


class NotFound(ObeliskError, LookupError):
    """A named group, channel or instance does not exist."""


def check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PolicyError(f"{kind} name {str(name)[:70]!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit")
    return name


def url_for(database: str | None, state_dir: Path | None) -> str:
    """The SQLAlchemy URL: `postgresql://...` (psycopg 3), `sqlite:///file`, or the state folder's SQLite file."""
    if database:
        if database.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + database.split("://", 1)[1]
        if database.startswith(("postgresql+psycopg://", "sqlite://")):
            return database
        raise FleetStoreError(f"unsupported database URL {database[:60]!r}: use postgresql://USER@HOST/DB or "
                         f"sqlite:///PATH")
    if state_dir is None:
        raise FleetStoreError("no database: pass --database postgresql://... or a --state-dir for the SQLite file")
    return f"sqlite:///{state_dir / DB_FILE}"


def alembic_config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head() or ""


def _set_wal(cur: Any, deadline_s: float = 30.0) -> None:
    """PRAGMA journal_mode=WAL, retried: two processes opening a new file at once can get SQLITE_BUSY
    here without SQLite's busy handler being consulted (seen in CI as "database is locked")."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > end:
                raise
            time.sleep(0.05)


def _sqlite_engine(url: str) -> Engine:
    path = sa.engine.make_url(url).database
    if path and path != ":memory:":
        parent = Path(path).parent
        if not parent.is_dir():
            raise FleetStoreError(f"cannot create the database {path}: folder {parent} does not exist")
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI objects
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below), as SQLAlchemy's docs advise
        cur = dbapi_conn.cursor()
        _set_wal(cur)  # readers do not block the writer
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writes take the lock up front (IMMEDIATE): a read-then-write transaction cannot deadlock.
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'IMMEDIATE')}")

    return engine


@dataclass
class GroupInfo:
    name: str
    channel: str
    policy: Policy
    paused: bool
    halted: bool
    halt_reason: str
    halted_at: float | None
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "channel": self.channel, "policy": self.policy.to_dict(), "paused": self.paused,
                "halted": self.halted, "halt_reason": self.halt_reason, "halted_at": self.halted_at,
                "updated_at": self.updated_at}


@dataclass
class ChannelInfo:
    name: str
    version: str | None
    floors: tuple[str, ...]
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "floors": list(self.floors), "updated_at": self.updated_at}


class Store:
    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        self._write_lock: Any = threading.Lock() if url.startswith("sqlite") else contextlib.nullcontext()
        try:
            if url.startswith("sqlite"):
                self.engine = _sqlite_engine(url)
            else:
                self.engine = sa.create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)
            self._migrate_at_start()
        except sa.exc.OperationalError as exc:
            first = str(exc.orig).strip().splitlines()[0]
            raise FleetStoreError(f"cannot open the database {self._safe_url()}: {first}") from None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def describe(self) -> str:
        """The database for a log line (no password)."""
        return self._safe_url()

    def _safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- schema

    def revision(self) -> str | None:
        with self.engine.connect() as c:
            return MigrationContext.configure(c).get_current_revision()

    def _migrate_at_start(self, deadline_s: float = 30.0) -> None:
        """migrate(), retried while another SQLite process holds the file's lock past the busy timeout's reach
        (several processes opening one new file at once: seen once in CI as "database is locked")."""
        end = time.monotonic() + deadline_s
        while True:
            try:
                self.migrate()
                return
            except sa.exc.OperationalError as exc:
                if self.dialect != "sqlite" or "locked" not in str(exc.orig) or time.monotonic() > end:
                    raise
                time.sleep(0.1)

    def migrate(self, target: str = "head") -> None:
        """Bring the schema to `target`; refuse a revision newer than this code (one line, no change)."""
        script = ScriptDirectory(str(MIGRATIONS))
        with self.engine.begin() as c:
            if c.dialect.name == "postgresql":
                # Replicas starting together on an empty database: one migrates, the others wait and find it done.
                c.exec_driver_sql("SELECT pg_advisory_xact_lock(7716334470)")
            current = MigrationContext.configure(c).get_current_revision()
            if current is not None:
                try:
                    script.get_revision(current)
                except Exception:  # alembic raises several kinds for an unknown id
                    raise FleetStoreError(
                        f"database {self._safe_url()} has schema revision {current!r}, newer than this server "
                        f"knows (newest {script.get_current_head()!r}): run the newer obelisk against it") from None
            command.upgrade(alembic_config(c), target)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        # SQLite: writers of this process queue here, not in SQLite's busy handler, whose sleeps of
        # up to 100 ms made the p99 of contended check-ins 40 times the p50.
        with self._write_lock, self.engine.begin() as c:
            yield c

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as c, c.begin():
            yield c

    # ---------------------------------------------------------------- channels and groups

    def set_channel(self, name: str, version: str | None, now: float, *, floors: list[str] | None = None
                    ) -> ChannelInfo:
        """Point a channel at a version (None: the newest release); floors replace the old list when given."""
        check_name("channel", name)
        if version is not None and (not isinstance(version, str) or len(version) > 64 or not is_version(version)):
            raise PolicyError(f"channel {name}: {str(version)[:70]!r} is not a version (expected e.g. 1.2.0)")
        fl = parse_floors(floors) if floors is not None else None
        with self.write() as c:
            row = c.execute(sa.select(m.channels).where(m.channels.c.name == name)).first()
            values: dict[str, Any] = {"version": version, "updated_at": now}
            if fl is not None:
                values["floors"] = json.dumps(list(fl))
            if row is None:
                values.setdefault("floors", "[]")
                c.execute(_insert(c, m.channels).values(name=name, **values).on_conflict_do_nothing())
            else:
                c.execute(sa.update(m.channels).where(m.channels.c.name == name).values(**values))
        return self.channel(name)

    def channel(self, name: str) -> ChannelInfo:
        with self.read() as c:
            row = c.execute(sa.select(m.channels).where(m.channels.c.name == name)).first()
        if row is None:
            raise NotFound(f"no channel {name!r}: create it with 'obelisk fleet channel set {name} VERSION'")
        return _channel(row)

    def channel_version_of(self, group: str) -> str | None:
        """The version the group's channel pins (an unconfigured group follows the channel of its name)."""
        with self.read() as c:
            row = c.execute(_GROUP_SETUP_VERSION, {"g": group}).first()
            if row is None:
                return c.execute(sa.select(m.channels.c.version).where(m.channels.c.name == group)).scalar()
            return row.version

    def channels(self) -> list[ChannelInfo]:
        with self.read() as c:
            return [_channel(r) for r in c.execute(sa.select(m.channels).order_by(m.channels.c.name))]

    def put_group(self, name: str, now: float, *, channel: str | None = None, policy: Policy | None = None
                  ) -> GroupInfo:
        """Create a group (channel defaults to its name) or change its channel and/or whole policy."""
        check_name("group", name)
        if channel is not None:
            check_name("channel", channel)
        with self.write() as c:
            row = c.execute(sa.select(m.groups).where(m.groups.c.name == name)).first()
            if row is None:
                c.execute(_insert(c, m.groups).values(name=name, channel=channel or name,
                                                      policy=json.dumps((policy or Policy()).to_dict()),
                                                      updated_at=now).on_conflict_do_nothing())
            else:
                values: dict[str, Any] = {"updated_at": now}
                if channel is not None:
                    values["channel"] = channel
                if policy is not None:
                    values["policy"] = json.dumps(policy.to_dict())
                c.execute(sa.update(m.groups).where(m.groups.c.name == name).values(**values))
            _ensure_state(c, name, now)
        return self.group(name)

    def set_policy(self, name: str, changes: dict[str, Any], now: float) -> GroupInfo:
        """Merge `changes` into the group's policy; every value is checked before anything is written."""
        check_name("group", name)
        if not isinstance(changes, dict):
            raise PolicyError("policy: expected a JSON object of fields to change")
        with self.write() as c:
            row = c.execute(sa.select(m.groups).where(m.groups.c.name == name)).first()
            base = policy_from_json(row.policy) if row is not None else Policy()
            new = base.updated(changes)  # raises before any write in this transaction
            if row is None:
                c.execute(_insert(c, m.groups).values(name=name, channel=name, policy=json.dumps(new.to_dict()),
                                                      updated_at=now).on_conflict_do_nothing())
            else:
                c.execute(sa.update(m.groups).where(m.groups.c.name == name)
                          .values(policy=json.dumps(new.to_dict()), updated_at=now))
            _ensure_state(c, name, now)
        return self.group(name)

    def group(self, name: str) -> GroupInfo:
        with self.read() as c:
            row = c.execute(_group_query().where(m.groups.c.name == name)).first()
        if row is None:
            raise NotFound(f"no group {name!r}: create it with 'obelisk fleet rollout set {name} ...'")
        return _group(row)

    def groups(self) -> list[GroupInfo]:
        with self.read() as c:
            return [_group(r) for r in c.execute(_group_query().order_by(m.groups.c.name))]

    def pause(self, name: str, now: float) -> GroupInfo:
        self.group(name)
        with self.write() as c:
            _ensure_state(c, name, now)
            c.execute(sa.update(m.rollout_state).where(m.rollout_state.c.group_name == name)
                      .values(paused=True, updated_at=now))
        return self.group(name)

    def resume(self, name: str, now: float) -> GroupInfo:
        """Unpause and lift a halt; the halt then counts only attempts that finish from now on."""
        self.group(name)
        with self.write() as c:
            _ensure_state(c, name, now)
            c.execute(sa.update(m.rollout_state).where(m.rollout_state.c.group_name == name)
                      .values(paused=False, halted=False, halt_reason="", halted_at=None, failures_since=now,
                              updated_at=now))
        return self.group(name)

    # ---------------------------------------------------------------- releases

    def note_release(self, app_id: str, version: str, now: float) -> float:
        """When the server first saw this release (soak time counts from it); recorded on first sight."""
        key = (m.releases.c.app_id == app_id.lower()) & (m.releases.c.version == version)
        with self.read() as c:
            at = c.execute(sa.select(m.releases.c.published_at).where(key)).scalar()
        if at is not None:
            return at
        with self.write() as c:  # replicas may see it first at the same moment: the first insert wins
            c.execute(_insert(c, m.releases).values(app_id=app_id.lower(), version=version, published_at=now)
                      .on_conflict_do_nothing())
            return c.execute(sa.select(m.releases.c.published_at).where(key)).scalar_one()

    def set_published(self, app_id: str, version: str, at: float) -> None:
        """Set a release's publish time (an operator back-dating a release that was already soaked elsewhere)."""
        self.note_release(app_id, version, at)
        with self.write() as c:
            c.execute(sa.update(m.releases).where((m.releases.c.app_id == app_id.lower())
                                                  & (m.releases.c.version == version)).values(published_at=at))

    # ---------------------------------------------------------------- the guard

    def grant(self, group: str, machine_id: str, version: str, target: str | None, now: float, *,
              published_at: float | None = None) -> Decision:
        """Decide and, when an update starts, record it, atomically under the group's row lock.

        `target` is the release the group's channel offers this host (None: none). The Omaha handler
        uses `tracking.check_in`, which runs the same guard inside its own transaction.
        """
        if _no_update(version, target):
            return decide(InstanceView(machine_id, version), GroupState(group, target), Policy(), now)
        with self.write() as c:
            # Lock order everywhere: the instance row, then the group's state row (no deadlock with tracking).
            c.execute(_TOUCH, {"m": machine_id, "now": now})
            return self.grant_in(c, group, machine_id, version, target, now, published_at=published_at)

    def grant_in(self, c: Connection, group: str, machine_id: str, version: str, target: str | None, now: float,
                 *, published_at: float | None = None) -> Decision:
        """`grant` inside the caller's transaction (which has already locked the instance row).

        First an unlocked look: a host the policy holds anyway (rate used up, window closed, wave
        not open...) is answered without the group's lock, so held hosts do not queue behind each
        other. Holding on a stale read is safe; only an offer is decided again under the lock.
        """
        if _no_update(version, target):
            return decide(InstanceView(machine_id, version), GroupState(group, target), Policy(), now)
        assert target is not None
        st = c.execute(_READ_STATE, {"g": group}).first()
        if st is not None:
            d, _ = self._decide(c, st, group, machine_id, version, target, now, published_at, locked=False)
            if not d.offer and not self._has_expired(c, group, now):  # timeouts are settled under the lock
                c.execute(_NOTE, {"m": machine_id, "note": d.reason[:m.TEXT_LEN]})
                return d
        st = self._lock_state(c, group, now)
        d, pending = self._decide(c, st, group, machine_id, version, target, now, published_at, locked=True)
        if d.offer and d.new_start:
            if pending is not None:  # an older grant the host never finished (the channel moved on)
                c.execute(_SUPERSEDE, {"m": machine_id, "now": now})
            c.execute(_NEW_ATTEMPT, {"g": group, "m": machine_id, "from": version, "v": d.version, "now": now})
            c.execute(_GRANTED, {"m": machine_id, "note": d.reason[:m.TEXT_LEN], "v": d.version})
        else:
            c.execute(_NOTE, {"m": machine_id, "note": d.reason[:m.TEXT_LEN]})
        return d

    def _has_expired(self, c: Connection, group: str, now: float) -> bool:
        policy, _, _ = self._group_setup(c, group)
        return c.execute(_ANY_EXPIRED, {"g": group, "cutoff": now - policy.timeout_s}).first() is not None

    def _decide(self, c: Connection, st: Any, group: str, machine_id: str, version: str, target: str, now: float,
                published_at: float | None, *, locked: bool) -> tuple[Decision, str | None]:
        """Read the group's counts and decide; under the lock also expire timed-out attempts and halt when due."""
        policy, floors, channel_set_at = self._group_setup(c, group)
        offered = next_version(version, target, floors)
        if locked and policy.timeout_s:
            c.execute(_EXPIRE, {"g": group, "cutoff": now - policy.timeout_s, "now": now})
        canary, canary_id = _canary(c, group, offered, st.failures_since) if policy.safe_mode else ("none", "")
        halted, reason = st.halted, st.halt_reason
        if locked and not halted:
            why = _safe_mode_halt(canary, canary_id, offered) or self._halt_check(c, group, policy, st.failures_since)
            if why is not None:
                _halt(c, group, why, now)
                halted, reason = True, why
        last = c.execute(_LAST_ATTEMPT, {"m": machine_id}).first()
        counted = c.execute(_IN_PERIOD, {"g": group, "since": now - policy.period_s}).one()
        pending = last.version if last is not None and last.outcome == "pending" else None
        failed = last is not None and last.outcome in ("failed", "timeout")
        inst = InstanceView(machine_id, version, pending, last.version if failed else None,
                            last.finished_at if failed else None)
        state = GroupState(group, target, floors, published_at, channel_set_at, st.paused, halted, reason,
                           int(counted[0]), counted[1], canary, canary_id)
        return decide(inst, state, policy, now), pending

    def _lock_state(self, c: Connection, group: str, now: float) -> Any:
        """Lock the group's state row (an UPDATE: PostgreSQL row lock, SQLite write lock) and read it."""
        st = c.execute(_LOCK_STATE, {"g": group}).first()
        if st is None:
            _ensure_state(c, group, now)
            st = c.execute(_LOCK_STATE, {"g": group}).one()
        return st

    def _group_setup(self, c: Connection, group: str) -> tuple[Policy, tuple[str, ...], float]:
        """(policy, channel floors, when the channel last moved); an unconfigured group: defaults, own channel."""
        row = c.execute(_GROUP_SETUP, {"g": group}).first()
        if row is None:
            ch = c.execute(_CHANNEL_SETUP, {"c": group}).first()
            return Policy(), _floors(ch.floors if ch else None), ch.updated_at if ch else 0.0
        return policy_from_json(row.policy), _floors(row.floors), row.ch_updated or 0.0

    def _halt_check(self, c: Connection, group: str, policy: Policy, since: float) -> str | None:
        if policy.halt_failure_share is None:
            return None
        rows = c.execute(sa.select(m.attempts.c.machine_id, m.attempts.c.outcome, m.attempts.c.error_code,
                                   m.attempts.c.reason)
                         .where((m.attempts.c.group_name == group)
                                & m.attempts.c.outcome.in_(("success", "failed", "timeout"))
                                & (m.attempts.c.finished_at >= since))
                         .order_by(m.attempts.c.finished_at.desc(), m.attempts.c.id.desc())
                         .limit(policy.halt_window)).all()
        return halt_reason([Attempt(r.machine_id, r.outcome, r.error_code, r.reason) for r in rows], policy)

    def finish_attempt(self, c: Connection, machine_id: str, outcome: str, now: float, *,
                       error_code: int | None = None, reason: str = "", reached: str | None = None) -> str | None:
        """End the instance's pending attempt (inside the caller's transaction); halts its group if due.

        `reached`: the version the host now runs; a success needs it at or past the attempt's version.
        Returns the group that halted, if one did.
        """
        row = c.execute(_LAST_ATTEMPT, {"m": machine_id}).first()
        if row is None or row.outcome != "pending":
            return None
        if outcome == "success" and (reached is None or compare_versions(reached, row.version) < 0):
            return None
        c.execute(sa.update(m.attempts).where(m.attempts.c.id == row.id).values(
            outcome=outcome, finished_at=now, error_code=error_code, reason=reason[:m.TEXT_LEN]))
        if outcome == "success":
            return None
        # Lock order as in grant: the state row first, so a halt and a grant never interleave.
        st = c.execute(_LOCK_STATE, {"g": row.group_name}).first()
        if st is None or st.halted:
            return None
        policy, _, _ = self._group_setup(c, row.group_name)
        why = None
        if policy.safe_mode:
            why = _safe_mode_halt(*_canary(c, row.group_name, row.version, st.failures_since), row.version)
        why = why or self._halt_check(c, row.group_name, policy, st.failures_since)
        if why is None:
            return None
        _halt(c, row.group_name, why, now)
        return row.group_name

    def preview(self, group: str, target: str | None, now: float, *, step: float = 0.0,
                horizon: float = 90 * 86400.0) -> list[PlanEntry]:
        """Which of the group's instances would start `target` when (policy.plan over the current state)."""
        check_name("group", group)
        with self.read() as c:
            st = c.execute(sa.select(_r.paused, _r.halted, _r.halt_reason, _r.failures_since)
                           .where(_r.group_name == group)).first()
            policy, floors, channel_set_at = self._group_setup(c, group)
            published = None
            if target is not None:
                published = c.execute(sa.select(sa.func.min(m.releases.c.published_at))
                                      .where(m.releases.c.version == target)).scalar()
            rows = c.execute(sa.select(_i.machine_id, _i.version).where(_i.group_name == group)
                             .order_by(_i.machine_id)).all()
            last = {r.machine_id: r for r in c.execute(
                sa.select(_a.machine_id, _a.version, _a.outcome, _a.finished_at)
                .where(_a.id.in_(sa.select(sa.func.max(_a.id)).where(_a.group_name == group)
                                 .group_by(_a.machine_id))))}
            started = tuple(t for (t,) in c.execute(sa.select(_a.started_at).where(
                (_a.group_name == group) & (_a.started_at > now - policy.period_s))))
        views = []
        for r in rows:
            a = last.get(r.machine_id)
            pending = a.version if a is not None and a.outcome == "pending" else None
            failed = a is not None and a.outcome in ("failed", "timeout")
            views.append(InstanceView(r.machine_id, r.version, pending, a.version if failed else None,
                                      a.finished_at if failed else None))
        state = GroupState(group, target, floors, published, channel_set_at, bool(st and st.paused),
                           bool(st and st.halted), st.halt_reason if st else "")
        return plan(views, state, policy, now, step=step, started=started, horizon=horizon)

    # ---------------------------------------------------------------- reading the fleet

    def instances(self, *, group: str | None = None, version: str | None = None, status: str | None = None,
                  seen_before: float | None = None, limit: int = 100, offset: int = 0
                  ) -> tuple[list[dict[str, Any]], int]:
        """A page of instances (ordered by machine id) and the total that match the filters."""
        cond = sa.true()
        if group is not None:
            cond = cond & (m.instances.c.group_name == group)
        if version is not None:
            cond = cond & (m.instances.c.version == version)
        if status is not None:
            cond = cond & (m.instances.c.status == status)
        if seen_before is not None:
            cond = cond & (m.instances.c.last_checkin < seen_before)
        with self.read() as c:
            total = c.execute(sa.select(sa.func.count()).select_from(m.instances).where(cond)).scalar_one()
            rows = c.execute(sa.select(m.instances).where(cond).order_by(m.instances.c.machine_id)
                             .limit(limit).offset(offset)).mappings().all()
        return [dict(r) for r in rows], total

    def instance(self, machine_id: str) -> dict[str, Any]:
        with self.read() as c:
            row = c.execute(sa.select(m.instances).where(m.instances.c.machine_id == machine_id)).mappings().first()
        if row is None:
            raise NotFound(f"no instance {machine_id[:70]!r}: list them with 'obelisk fleet instances'")
        return dict(row)

    def events_of(self, machine_id: str, limit: int = 100) -> list[dict[str, Any]]:
        self.instance(machine_id)
        with self.read() as c:
            rows = c.execute(sa.select(m.events).where(m.events.c.machine_id == machine_id)
                             .order_by(m.events.c.id.desc()).limit(limit)).mappings().all()
        return [dict(r) for r in rows]

    def attempts_of(self, group: str) -> list[dict[str, Any]]:
        with self.read() as c:
            rows = c.execute(sa.select(m.attempts).where(m.attempts.c.group_name == group)
                             .order_by(m.attempts.c.id)).mappings().all()
        return [dict(r) for r in rows]

    def counts(self) -> list[dict[str, Any]]:
        """Instances per (group, version, status): the overview and the metrics."""
        q = (sa.select(m.instances.c.group_name, m.instances.c.version, m.instances.c.status, sa.func.count())
             .group_by(m.instances.c.group_name, m.instances.c.version, m.instances.c.status))
        with self.read() as c:
            return [{"group": g, "version": v, "status": s, "count": n} for g, v, s, n in c.execute(q)]

    def stale_counts(self, seen_before: float) -> list[tuple[str, int]]:
        """(group, instances not seen since `seen_before`)."""
        q = (sa.select(_i.group_name, sa.func.count()).where(_i.last_checkin < seen_before)
             .group_by(_i.group_name).order_by(_i.group_name))
        with self.read() as c:
            return [(g, n) for g, n in c.execute(q)]

    def attempt_totals(self) -> list[dict[str, Any]]:
        """Attempts per (group, outcome) since the database was created (metrics)."""
        q = (sa.select(m.attempts.c.group_name, m.attempts.c.outcome, sa.func.count())
             .group_by(m.attempts.c.group_name, m.attempts.c.outcome))
        with self.read() as c:
            return [{"group": g, "outcome": o, "count": n} for g, o, n in c.execute(q)]

    def prune(self, max_age: float, now: float) -> int:
        """Delete instances (and their events and attempts) not seen for `max_age` seconds."""
        cutoff = now - max_age
        old = sa.select(m.instances.c.machine_id).where(m.instances.c.last_checkin < cutoff)
        with self.write() as c:
            c.execute(sa.delete(m.events).where(m.events.c.machine_id.in_(old)))
            c.execute(sa.delete(m.attempts).where(m.attempts.c.machine_id.in_(old)))
            return c.execute(sa.delete(m.instances).where(m.instances.c.last_checkin < cutoff)).rowcount


# ---------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=512)
def policy_from_json(text: str) -> Policy:
    """A stored policy (validated when it was written; parsed once per distinct text)."""
    return Policy.from_dict(json.loads(text))


@functools.lru_cache(maxsize=512)
def _floors(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


def _no_update(version: str, target: str | None) -> bool:
    return target is None or compare_versions(version, target) >= 0


# The guard's statements, built once (building Core constructs per request cost more than running them).
_a, _r, _i = m.attempts.c, m.rollout_state.c, m.instances.c
_TOUCH = sa.update(m.instances).where(_i.machine_id == sa.bindparam("m")).values(updated_at=sa.bindparam("now"))
_LOCK_STATE = (sa.update(m.rollout_state).where(_r.group_name == sa.bindparam("g")).values(seq=_r.seq + 1)
               .returning(_r.paused, _r.halted, _r.halt_reason, _r.failures_since))
_READ_STATE = sa.select(_r.paused, _r.halted, _r.halt_reason, _r.failures_since).where(
    _r.group_name == sa.bindparam("g"))
_ANY_EXPIRED = sa.select(_a.id).where((_a.group_name == sa.bindparam("g")) & (_a.outcome == "pending")
                                      & (_a.started_at < sa.bindparam("cutoff"))).limit(1)
_GROUP_SETUP = (sa.select(m.groups.c.policy, m.groups.c.channel, m.channels.c.floors,
                          m.channels.c.updated_at.label("ch_updated"))
                .select_from(m.groups.outerjoin(m.channels, m.channels.c.name == m.groups.c.channel))
                .where(m.groups.c.name == sa.bindparam("g")))
_GROUP_SETUP_VERSION = (sa.select(m.channels.c.version)
                        .select_from(m.groups.outerjoin(m.channels, m.channels.c.name == m.groups.c.channel))
                        .where(m.groups.c.name == sa.bindparam("g")))
_CHANNEL_SETUP = sa.select(m.channels.c.floors, m.channels.c.updated_at).where(m.channels.c.name == sa.bindparam("c"))
_EXPIRE = (sa.update(m.attempts).where((_a.group_name == sa.bindparam("g")) & (_a.outcome == "pending")
                                       & (_a.started_at < sa.bindparam("cutoff")))
           .values(outcome="timeout", finished_at=sa.bindparam("now"), reason="did not finish within update_timeout"))
_LAST_ATTEMPT = (sa.select(_a.id, _a.group_name, _a.version, _a.outcome, _a.finished_at)
                 .where(_a.machine_id == sa.bindparam("m")).order_by(_a.id.desc()).limit(1))
_IN_PERIOD = sa.select(sa.func.count(), sa.func.min(_a.started_at)).where(
    (_a.group_name == sa.bindparam("g")) & (_a.started_at > sa.bindparam("since")))
_SUPERSEDE = (sa.update(m.attempts).where((_a.machine_id == sa.bindparam("m")) & (_a.outcome == "pending"))
              .values(outcome="superseded", finished_at=sa.bindparam("now")))
_NEW_ATTEMPT = sa.insert(m.attempts).values(group_name=sa.bindparam("g"), machine_id=sa.bindparam("m"),
                                            from_version=sa.bindparam("from"), version=sa.bindparam("v"),
                                            started_at=sa.bindparam("now"))
_GRANTED = sa.update(m.instances).where(_i.machine_id == sa.bindparam("m")).values(
    note=sa.bindparam("note"), status="granted", target_version=sa.bindparam("v"))
_NOTE = sa.update(m.instances).where(_i.machine_id == sa.bindparam("m")).values(note=sa.bindparam("note"))


def _insert(c: Connection, table: sa.Table) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (PostgreSQL and SQLite both)."""
    return (sa.dialects.postgresql.insert if c.dialect.name == "postgresql" else sa.dialects.sqlite.insert)(table)


def _ensure_state(c: Connection, group: str, now: float) -> None:
    c.execute(_insert(c, m.rollout_state).values(group_name=group, updated_at=now).on_conflict_do_nothing())


def _halt(c: Connection, group: str, reason: str, now: float) -> None:
    c.execute(sa.update(m.rollout_state).where(m.rollout_state.c.group_name == group)
              .values(halted=True, halt_reason=reason[:m.TEXT_LEN], halted_at=now, updated_at=now))


def _canary(c: Connection, group: str, version: str, since: float) -> tuple[str, str]:
    """Safe mode: how the first attempt at `version` in this group went (since the last resume)."""
    rows = c.execute(sa.select(m.attempts.c.machine_id, m.attempts.c.outcome).where(
        (m.attempts.c.group_name == group) & (m.attempts.c.version == version) & (m.attempts.c.started_at >= since)
        & (m.attempts.c.outcome != "superseded")).order_by(m.attempts.c.id)).all()
    if not rows:
        return "none", ""
    for r in rows:
        if r.outcome == "success":
            return "succeeded", r.machine_id
    pending = [r for r in rows if r.outcome == "pending"]
    if pending:
        return "pending", pending[0].machine_id
    return "failed", rows[-1].machine_id


def _safe_mode_halt(canary: str, canary_id: str, version: str) -> str | None:
    if canary != "failed":
        return None
    return (f"halted: safe mode: the first host {canary_id} failed to update to {version}; "
            f"resume with 'obelisk fleet rollout resume' to try another")


def _channel_floors(c: Connection, channel: str) -> tuple[tuple[str, ...], float]:
    row = c.execute(sa.select(m.channels.c.floors, m.channels.c.updated_at).where(m.channels.c.name == channel)).first()
    if row is None:
        return (), 0.0
    return tuple(json.loads(row.floors)), row.updated_at


def _group_query() -> sa.Select:
    j = m.groups.outerjoin(m.rollout_state, m.rollout_state.c.group_name == m.groups.c.name)
    return sa.select(m.groups, m.rollout_state.c.paused, m.rollout_state.c.halted, m.rollout_state.c.halt_reason,
                     m.rollout_state.c.halted_at).select_from(j)


def _group(row: Any) -> GroupInfo:
    return GroupInfo(row.name, row.channel, policy_from_json(row.policy), bool(row.paused),
                     bool(row.halted), row.halt_reason or "", row.halted_at, row.updated_at)


def _channel(row: Any) -> ChannelInfo:
    return ChannelInfo(row.name, row.version, tuple(json.loads(row.floors)), row.updated_at)
