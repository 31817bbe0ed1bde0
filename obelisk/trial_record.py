"""Why a trial boot failed, kept across the fallback: the boot check writes it, the daemon reads it.

The boot check (``/usr/lib/obelisk/obelisk-boot-check``) of a failing trial writes
``/var/lib/obelisk/trial-failure`` (ROOT, shared by both slots, synced before the reboot) as
``key=value`` lines: ``time``, ``slot``, ``version``, ``reason``. After the fallback the daemon reads it,
sends the reason with the rollback event (3/0, code 44) and, once the server has it, renames it to
``trial-failure.sent`` (so it is not sent twice, and `obelisk boot status` can still say why the host
fell back).

Records from before userspace use the same format, with ``source`` (``health-check`` when absent,
``initramfs``, ``grub``, ``pstore``) and an optional ``detail`` line: the initramfs leaves one on the
ESP (``/EFI/obelisk/trial-<slot>.txt``) when it cannot open or mount ``/usr``, GRUB marks a slot whose
kernel or initrd did not load (grubenv ``obelisk_loadfail``, passed on as ``obelisk.loadfail=``), and the
kernel's pstore keeps a panic's last lines where the firmware offers it. The initramfs of the next boot
(``bootloader/initramfs/functions.sh``: ``collect_records``) turns them into ``trial-failure`` and
appends every record it writes, and every one the boot check writes, to ``boot-log`` (bounded; what
``obelisk boot log`` shows). On a trial boot the initramfs also leaves ``trial-boot`` (time, slot,
version) just before it hands over to userspace. No record at all means the trial never reached the
initramfs (firmware, GRUB or the kernel's load); ``trial-boot`` without a record means it reached
userspace and stopped before anything was recorded. On the ground floor: the daemon and
``obelisk boot`` both read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

NAME = "trial-failure"
SENT = NAME + ".sent"
LOG = "boot-log"            # every record kept, oldest first, separated by "--" lines (bounded by its writers)
TRIAL_BOOT = "trial-boot"   # the initramfs's note that a trial boot reached userspace
STATE_DIR = Path("/var/lib/obelisk")
MAX_REASON = 300  # what the server keeps of a host's text (update_server cuts longer ones too)
MAX_DETAIL = 1000
MAX_FILE = 4096
MAX_LOG = 65536   # read at most this much of boot-log (its writers keep it at 16 KiB)
MAX_LOG_RECORDS = 50
SOURCES = ("health-check", "initramfs", "grub", "pstore")
NO_RECORD = "no record of the trial: it never reached the initramfs (firmware, GRUB or kernel load)"
REACHED_USERSPACE = ("no record of the trial: it reached userspace (the initramfs handed over at {when}) and stopped "
                     "before anything was recorded (a hang, a reset, or a panic the firmware kept no pstore of)")
ESP_RECORD = "EFI/obelisk/trial-{slot}.txt"  # on the ESP, one per slot, written by the initramfs
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_SLOT = re.compile(r"^[AB]$")


@dataclass(frozen=True)
class TrialFailure:
    time: float
    slot: str
    version: str
    reason: str
    source: str = ""   # "" = health-check (the boot check's records carry none)
    detail: str = ""

    def to_json(self) -> dict:
        return {"time": self.time, "slot": self.slot, "version": self.version, "source": self.source or "health-check",
                "reason": self.reason, "detail": self.detail}


def sanitize(text: str, limit: int = MAX_REASON) -> str:
    """One line, no control characters, at most ``limit`` characters."""
    one = _CONTROL.sub(" ", text).strip()
    return one if len(one) <= limit else one[: limit - 3] + "..."


def parse(raw: str | bytes) -> TrialFailure | None:
    """One record from ``key=value`` text (at most MAX_FILE of it), or None when it is not one."""
    if isinstance(raw, bytes):
        raw = raw[:MAX_FILE].decode(errors="replace")
    fields: dict[str, str] = {}
    for line in raw[:MAX_FILE].splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    if not fields.get("reason"):
        return None
    try:
        when = float(fields.get("time") or 0)
        if not 0 <= when < 1e11:
            when = 0.0
    except ValueError:
        when = 0.0
    source = fields.get("source", "")
    return TrialFailure(when, sanitize(fields.get("slot", ""), 8), sanitize(fields.get("version", ""), 64),
                        sanitize(fields["reason"]), source if source in SOURCES else "",
                        sanitize(fields.get("detail", ""), MAX_DETAIL))


def _read_bounded(path: Path, limit: int) -> bytes | None:
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def read(state_dir: Path, name: str = NAME) -> TrialFailure | None:
    """The record, or None when there is none or it is not one (a damaged file is not a reason)."""
    raw = _read_bounded(state_dir / name, MAX_FILE)
    return None if raw is None else parse(raw)


def history(state_dir: Path) -> list[TrialFailure]:
    """The records kept in ``boot-log``, oldest first (the newest MAX_LOG_RECORDS; damaged ones skipped)."""
    raw = _read_bounded(state_dir / LOG, MAX_LOG)
    if raw is None:
        return []
    out = []
    for chunk in raw.decode(errors="replace").split("\n--\n"):
        rec = parse(chunk)
        if rec is not None:
            out.append(rec)
    return out[-MAX_LOG_RECORDS:]


def reason_for(state_dir: Path, version: str | None) -> str:
    """What to tell the server about the failed trial of ``version``."""
    rec = read(state_dir)
    if rec is None or (version and rec.version and rec.version != version):
        started = read_trial_boot(state_dir)
        if started is not None and (not version or started.version in ("", version)):
            return sanitize(REACHED_USERSPACE.format(when=_when(started.time)))
        return NO_RECORD
    return f"trial of {rec.version or version} on slot {rec.slot or '?'} failed: {rec.reason}"


def read_trial_boot(state_dir: Path) -> TrialFailure | None:
    """The initramfs's note of the last trial boot that reached userspace (reason "reached userspace")."""
    raw = _read_bounded(state_dir / TRIAL_BOOT, MAX_FILE)
    if raw is None:
        return None
    return parse(raw.decode(errors="replace") + "\nreason=reached userspace\n")


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


def _when(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t > 0 else "an unknown time"


def describe(rec: TrialFailure) -> str:
    """One line: "slot B (1.2.0) fell back at 2026-12-03 12:40:00 UTC: <reason>"."""
    return f"slot {rec.slot or '?'} ({rec.version or '?'}) fell back at {_when(rec.time)}: {rec.reason}"


def describe_entry(rec: TrialFailure) -> str:
    """One line of `obelisk boot log`: time, slot, version, where it came from, the reason."""
    where = rec.source or "health-check"
    return f"{_when(rec.time)}  slot {rec.slot or '?'} ({rec.version or '?'})  {where}: {rec.reason}"


def grub_mark(mark: str) -> TrialFailure | None:
    """The record of GRUB's load-failure mark ("B:linux:1.2.0", grubenv obelisk_loadfail)."""
    slot, _, rest = mark.partition(":")
    step, _, version = rest.partition(":")
    if not _SLOT.match(slot) or step not in ("linux", "initrd", "boot"):
        return None
    what = {"linux": "kernel", "initrd": "initrd", "boot": "kernel (boot returned)"}[step]
    return TrialFailure(0.0, slot, sanitize(version, 64), f"GRUB could not load the {what} of slot {slot}; "
                        "it booted the other slot instead", "grub")
