"""What the update daemon remembers across restarts and power cuts (`<state dir>/state.json`).

Like update_engine's prefs: the status, the previous version recorded at postinstall (so the
first check after the reboot reports 3/2 with it, or 3/0 errorcode 44 if the host came back on
it), the version staged and the boot it was staged in, versions that rolled back (never taken
again), the aleph version, and the error backoff. Written atomically (tmp + fsync + rename).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path

from obelisk.atomicfile import write_atomic

STATE_FILE = "state.json"


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

    def public(self) -> dict:
        """The `obelisk update status --json` view."""
        return {k: getattr(self, k) for k in ("state", "current_version", "new_version", "new_size", "progress",
                                             "last_checked", "last_error", "last_error_code", "staged_version",
                                             "staged_slot", "previous_version", "failed_versions")}


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


def save_state(state_dir: Path, st: DaemonState) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(state_dir / STATE_FILE, json.dumps(asdict(st), sort_keys=True, indent=1).encode())
