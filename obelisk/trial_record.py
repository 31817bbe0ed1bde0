"""Why a trial boot failed, kept across the fallback: the boot check writes it, the daemon reads it.

The boot check (``/usr/lib/obelisk/obelisk-boot-check``) of a failing trial writes
``/var/lib/obelisk/trial-failure`` (ROOT, shared by both slots, synced before the reboot) as
``key=value`` lines: ``time``, ``slot``, ``version``, ``reason``. After the fallback the daemon reads it,
sends the reason with the rollback event (3/0, code 44) and, once the server has it, renames it to
``trial-failure.sent`` (so it is not sent twice, and `obelisk boot status` can still say why the host
fell back). No record means the trial never reached the health check: firmware, GRUB, the kernel or
the initramfs. On the ground floor: the daemon and `obelisk boot status` both read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

NAME = "trial-failure"
SENT = NAME + ".sent"
STATE_DIR = Path("/var/lib/obelisk")
MAX_REASON = 300  # what the server keeps of a host's text (update_server cuts longer ones too)
MAX_FILE = 4096
NO_RECORD = "no record of the trial: it never reached the health check (firmware, GRUB, kernel or initramfs)"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class TrialFailure:
    time: float
    slot: str
    version: str
    reason: str


def sanitize(text: str, limit: int = MAX_REASON) -> str:
    """One line, no control characters, at most ``limit`` characters."""
    one = _CONTROL.sub(" ", text).strip()
    return one if len(one) <= limit else one[: limit - 3] + "..."


def read(state_dir: Path, name: str = NAME) -> TrialFailure | None:
    """The record, or None when there is none or it is not one (a damaged file is not a reason)."""
    path = state_dir / name
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE).decode(errors="replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in raw.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    if not fields.get("reason"):
        return None
    try:
        when = float(fields.get("time") or 0)
    except ValueError:
        when = 0.0
    return TrialFailure(when, sanitize(fields.get("slot", ""), 8), sanitize(fields.get("version", ""), 64),
                        sanitize(fields["reason"]))


def reason_for(state_dir: Path, version: str | None) -> str:
    """What to tell the server about the failed trial of ``version``."""
    rec = read(state_dir)
    if rec is None or (version and rec.version and rec.version != version):
        return NO_RECORD
    return f"trial of {rec.version or version} on slot {rec.slot or '?'} failed: {rec.reason}"


def mark_sent(state_dir: Path) -> None:
    """The server has the record: keep it only as the last one (replacing the one before)."""
    if (state_dir / NAME).is_file():
        (state_dir / NAME).replace(state_dir / SENT)


def last(state_dir: Path) -> tuple[TrialFailure, bool] | None:
    """The newest record and whether it was sent to the update server."""
    rec = read(state_dir)
    if rec is not None:
        return rec, False
    rec = read(state_dir, SENT)
    return (rec, True) if rec is not None else None


def describe(rec: TrialFailure) -> str:
    """One line: "slot B (1.2.0) fell back at 2026-12-03 12:40:00 UTC: <reason>"."""
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.time)) if rec.time > 0 else "an unknown time"
    return f"slot {rec.slot or '?'} ({rec.version or '?'}) fell back at {when}: {rec.reason}"
