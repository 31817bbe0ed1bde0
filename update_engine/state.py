"""What the update daemon remembers across restarts and power cuts (`<state dir>/state.json`).

Like update_engine's prefs: the status, the previous version recorded at postinstall (so the
first check after the reboot reports 3/2 with it, or 3/0 errorcode 44 if the host came back on
it), the version staged and the boot it was staged in, versions that rolled back (never taken
again), the aleph version, and the error backoff. Written atomically (tmp + fsync + rename).

The daemon changes its state only through :class:`StateMachine`: ``TRANSITIONS`` lists every move a
run may make (check → download → verify → finalize → need reboot, or → report the error → idle), and
``StateMachine.move`` is the one place that checks a move against it, changes the state, persists it and
tells systemd. Every state may go back to IDLE: a run that was stopped, killed or crashed starts over
from there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path

from obelisk.atomicfile import write_atomic

log = logging.getLogger("obelisk.update")

STATE_FILE = "state.json"
STATE_DIR_MODE = 0o700
STATE_FILE_MODE = 0o600


class Status(StrEnum):
    IDLE = "IDLE"
    CHECKING_FOR_UPDATE = "CHECKING_FOR_UPDATE"
    UPDATE_AVAILABLE = "UPDATE_AVAILABLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    FINALIZING = "FINALIZING"
    UPDATED_NEED_REBOOT = "UPDATED_NEED_REBOOT"
    REPORTING_ERROR_EVENT = "REPORTING_ERROR_EVENT"


@dataclass
class DaemonState:
    state: str = Status.IDLE
    current_version: str = ""
    new_version: str = ""
    new_size: int = 0
    progress: float = 0.0
    last_checked: float = 0.0  # unix time of the last completed update check
    last_error: str | None = None
    last_error_code: int | None = None
    # Flatcar's `previous-version` pref: None = never set ("initial"), "" = already reported.
    previous_version: str | None = None
    staged_version: str | None = None
    staged_boot_id: str | None = None
    staged_slot: str | None = None
    failed_versions: list[str] = field(default_factory=list)
    aleph_version: str = ""
    consecutive_failures: int = 0
    release_lock_pending: bool = False
    rollback_reason: str = ""  # why the last trial failed (obelisk/trial_record.py), as sent to the server

    def public(self) -> dict:
        """The `obelisk update status --json` view."""
        return {k: getattr(self, k) for k in ("state", "current_version", "new_version", "new_size", "progress",
                                             "last_checked", "last_error", "last_error_code", "staged_version",
                                             "staged_slot", "previous_version", "failed_versions",
                                             "rollback_reason")}


def load_state(state_dir: Path) -> DaemonState:
    try:
        obj = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return DaemonState()
    if not isinstance(obj, dict):
        return DaemonState()
    known = {f.name for f in fields(DaemonState)}
    try:
        return DaemonState(**{k: v for k, v in obj.items() if k in known})
    except TypeError:
        return DaemonState()


def ensure_dir(path: Path, mode: int, *, parents_mode: int = 0o755) -> None:
    """Make ``path`` (and missing parents) with explicit modes: the umask never decides who may look in."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
            os.chmod(d, mode if d == path else parents_mode)


def save_state(state_dir: Path, st: DaemonState) -> None:
    ensure_dir(state_dir, STATE_DIR_MODE)
    write_atomic(state_dir / STATE_FILE, json.dumps(asdict(st), sort_keys=True, indent=1).encode(),
                 mode=STATE_FILE_MODE)


# ---------------------------------------------------------------- the state machine

S = Status
# Every state may stay where it is (a field changes) and may go back to IDLE.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.IDLE: frozenset({S.IDLE, S.CHECKING_FOR_UPDATE,
                       S.UPDATED_NEED_REBOOT}),  # a stage the GPT shows complete, or a trial still pending
    S.CHECKING_FOR_UPDATE: frozenset({S.CHECKING_FOR_UPDATE, S.IDLE, S.UPDATE_AVAILABLE, S.REPORTING_ERROR_EVENT}),
    S.UPDATE_AVAILABLE: frozenset({S.UPDATE_AVAILABLE, S.DOWNLOADING, S.REPORTING_ERROR_EVENT, S.IDLE}),
    S.DOWNLOADING: frozenset({S.DOWNLOADING, S.VERIFYING, S.REPORTING_ERROR_EVENT, S.IDLE}),
    S.VERIFYING: frozenset({S.VERIFYING, S.FINALIZING, S.REPORTING_ERROR_EVENT, S.IDLE}),
    S.FINALIZING: frozenset({S.FINALIZING, S.UPDATED_NEED_REBOOT, S.REPORTING_ERROR_EVENT, S.IDLE}),
    S.UPDATED_NEED_REBOOT: frozenset({S.UPDATED_NEED_REBOOT, S.IDLE}),  # IDLE: marked good or rolled back
    S.REPORTING_ERROR_EVENT: frozenset({S.REPORTING_ERROR_EVENT, S.IDLE}),
}
IN_FLIGHT = frozenset(TRANSITIONS) - {S.IDLE, S.UPDATED_NEED_REBOOT}  # a run was under way when this was saved


class StateMachine:
    """The daemon's persisted state; ``move`` is the only way it changes (checked, saved, announced)."""

    def __init__(self, state_dir: Path, *, notify: Callable[[DaemonState], None] | None = None,
                 save_every: float = 1.0) -> None:
        self.state_dir = state_dir
        self.lock = threading.RLock()
        self.st = load_state(state_dir)
        if self.st.state not in TRANSITIONS:  # a state file from elsewhere: start from the beginning
            self.st.state = Status.IDLE
        self.notify = notify
        self.save_every = save_every
        self._last_save = 0.0

    @property
    def state(self) -> Status:
        return Status(self.st.state)

    def move(self, to: Status, **fields: object) -> None:
        """Go to ``to`` with ``fields`` changed, if ``TRANSITIONS`` allows it; persist; tell systemd on a change."""
        with self.lock:
            here = self.state
            if to not in TRANSITIONS[here]:
                # A bug, not bad input: a plain RuntimeError, so no CLI's clean_errors() hides its traceback.
                raise RuntimeError(f"bug: update state {here} cannot go to {to}")
            for k in fields:
                if not hasattr(self.st, k):
                    raise AttributeError(f"DaemonState has no field {k!r}")
            self.st.state = to
            for k, v in fields.items():
                setattr(self.st, k, v)
            self._save()
        if self.notify is not None:
            self.notify(self.st)
        if to != here:
            log.info("state %s", to)

    def record(self, **fields: object) -> None:
        """Change fields and persist, staying in the current state."""
        self.move(self.state, **fields)

    def progress(self, value: float) -> None:
        """Download progress: kept in memory at once, saved at most every ``save_every`` seconds."""
        with self.lock:
            self.st.progress = value
            now = time.monotonic()
            if now - self._last_save >= self.save_every:
                self._save()

    def public(self) -> dict:
        with self.lock:
            return self.st.public()

    def _save(self) -> None:
        save_state(self.state_dir, self.st)
        self._last_save = time.monotonic()
