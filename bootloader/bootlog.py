"""What a host kept about its failed boots, for `obelisk boot log` (formats: ``obelisk.trial_record``).

Three places, read only and bounded (anything there may be damaged or hostile; a record that is not
one is skipped, text is sanitised to one printable line):
- ROOT (``/var/lib/obelisk``): ``boot-log``, every record the boot check and the initramfs's collector
  wrote, oldest first; ``trial-failure`` / ``trial-failure.sent`` when the log does not have them.
- the ESP: ``/EFI/obelisk/trial-<slot>.txt``, a record the initramfs left that no later boot has
  collected yet (the collector moves it into ROOT and deletes it).
- the grubenv: ``obelisk_loadfail``, GRUB's mark of a slot whose kernel or initrd did not load (GRUB
  clears it when that slot loads again).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bootloader import esp, gpt, grub, loader
from bootloader.layout import SLOT_NAMES
from obelisk import trial_record
from obelisk.trial_record import TrialFailure


@dataclass(frozen=True)
class Entry:
    record: TrialFailure
    where: str

    def to_json(self) -> dict:
        return {**self.record.to_json(), "where": self.where}


def root_entries(state_dir: Path) -> list[Entry]:
    where = str(state_dir / trial_record.LOG)
    found = [Entry(r, where) for r in trial_record.history(state_dir)]
    seen = {e.record for e in found}
    for name in (trial_record.SENT, trial_record.NAME):
        rec = trial_record.read(state_dir, name)
        if rec is not None and rec not in seen:
            found.append(Entry(rec, str(state_dir / name)))
            seen.add(rec)
    return found


def disk_entries(disk: Path) -> tuple[list[Entry], list[str]]:
    """Records on the disk's ESP and GRUB's mark; and warnings about what could not be read."""
    found: list[Entry] = []
    warnings: list[str] = []
    for n in SLOT_NAMES:
        path = trial_record.ESP_RECORD.format(slot=n)
        try:
            raw = esp.read_file(disk, path, max_bytes=trial_record.MAX_FILE)
        except (esp.EspError, gpt.GptError):
            continue  # no such file (or no ESP): nothing kept there
        except OSError as exc:
            warnings.append(f"cannot read the ESP of {disk}: {exc.strerror}")
            break
        rec = trial_record.parse(raw)
        if rec is not None:
            if not rec.source:
                rec = TrialFailure(rec.time, rec.slot, rec.version, rec.reason, "initramfs", rec.detail)
            found.append(Entry(rec, f"ESP /{path} (not collected yet)"))
    try:
        env = loader.read_env(disk)
    except gpt.GptError as exc:
        warnings.append(str(exc))
        env = None
    if env is not None and env.loadfail:
        rec = trial_record.grub_mark(env.loadfail)
        if rec is not None:
            found.append(Entry(rec, f"grubenv {grub.LOADFAIL_VAR}"))
    return found, warnings


def entries(*, disk: Path | None, state_dir: Path | None, slot: str | None) -> tuple[list[Entry], list[str]]:
    found: list[Entry] = []
    warnings: list[str] = []
    if state_dir is not None:
        found += root_entries(state_dir)
    if disk is not None:
        more, warnings = disk_entries(disk)
        found += more
    if slot is not None:
        found = [e for e in found if e.record.slot == slot]
    return found, warnings
