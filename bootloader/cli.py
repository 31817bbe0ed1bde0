"""`obelisk boot`: the A/B slot commands (parse, call, print)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from bootloader import bootlog, gpt, layout, slots
from bootloader.layout import SLOT_NAMES, USR_A, USR_B, name_of
from obelisk import trial_record
from obelisk.errors import ObeliskError, clean_errors
from obelisk.inputs import check_input
from obelisk.tools import run

app = typer.Typer(help="Show and change A/B slot state in the GPT.", no_args_is_help=True)

DiskOpt = typer.Option(None, "--disk", help="Disk image or block device (default: the disk holding the booted /usr).")
SLOT_HELP = f"partition index ({USR_A}, {USR_B}) or {' / '.join(SLOT_NAMES)}"


def _disk(disk: Path | None) -> Path:
    """The disk to act on, refused before any open when it is not a file or block device (a FIFO would hang)."""
    return check_input(disk if disk is not None else slots.find_boot_disk(), "disk", block_device=True)


def _warn_if_damaged(disk: Path) -> None:
    """Reading works from either copy; say so when one is damaged (no write: repair is explicit)."""
    table = gpt.read_table(disk)
    for problem in table.problems:
        print(f"warning: {disk}: {problem} — run 'obelisk boot repair' (or any write) to fix it", file=sys.stderr)


def _line(s: slots.Slot) -> str:
    state = f"priority={s.priority} tries={s.tries} successful={int(s.successful)}"
    return f"{s.label or s.name} (partition {s.index}): {state}"


def running_slot(cmdline: Path = Path("/proc/cmdline")) -> str | None:
    """The slot this system booted from (GRUB's obelisk.slot=), or None when it was not booted by obelisk."""
    try:
        words = cmdline.read_text().split()
    except OSError:
        return None
    return next((w.split("=", 1)[1] for w in words if w.startswith("obelisk.slot=")), None)


def fallback(state_dir: Path | None, running: str | None) -> dict | None:
    """The last failed trial (obelisk/trial_record.py) when this host is not running that slot now."""
    if state_dir is None:
        return None
    found = trial_record.last(state_dir)
    if found is None or (running is not None and found[0].slot == running):
        return None
    rec, sent = found
    return {"slot": rec.slot, "version": rec.version, "time": rec.time, "reason": rec.reason, "reported": sent,
            "text": trial_record.describe(rec)}


@app.command()
def status(
    disk: Path | None = DiskOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="where the last failed trial is recorded "
                                          "(default on a running host: /var/lib/obelisk; none with --disk)"),
) -> None:
    """Every USR slot with its priority, tries and successful flag, which would boot next, the running slot,
    and why the host last fell back from a trial."""
    with clean_errors():
        d = _disk(disk)
        found = slots.read_slots(d)
        _warn_if_damaged(d)
        nxt = slots.next_index(found)
    running = running_slot() if disk is None else None
    fell = fallback(state_dir if state_dir is not None or disk is not None else trial_record.STATE_DIR, running)
    if as_json:
        print(json.dumps({"slots": [s.to_json() for s in found], "next": nxt, "running": running,
                          "fallback": fell}, indent=2))
        return
    table = Table(title=f"USR slots on {d}", box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    for col in ("slot", "part", "label", "partition GUID", "prio", "tries", "good"):
        table.add_column(col, no_wrap=True, min_width=len(col))
    for s in found:
        table.add_row(s.name + (" *" if s.index == nxt else ""), str(s.index), s.label, str(s.uuid), str(s.priority),
                      str(s.tries), "yes" if s.successful else "no")
    console = Console()
    console.print(table)
    chosen = next((s for s in found if s.index == nxt), None)
    console.print(f"* next boot: slot {chosen.name} (partition {nxt})" if chosen else "next boot: none (none bootable)")
    if running:
        console.print(f"running: slot {running}")
    if fell:
        # Plain print: one line however long (rich would wrap it and read markup in a host's text).
        print(f"last fallback: {fell['text']}" + ("" if fell["reported"] else " (not yet reported)"))


@app.command("log")
def log_cmd(
    slot: str | None = typer.Option(None, "--slot", metavar="A|B", help="Only this slot's records (A, B, 3 or 4)."),
    disk: Path | None = DiskOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="where ROOT keeps the records "
                                          "(default on a running host: /var/lib/obelisk; none with --disk)"),
) -> None:
    """What was kept about failed boots (docs/health.md): the boot check's and the initramfs's records on
    ROOT, records on the ESP no boot has collected yet, and GRUB's mark of a kernel that did not load."""
    warnings: list[str] = []
    with clean_errors():
        name = None
        if slot is not None:
            index = layout.parse_slot(slot)
            if index is None:
                raise slots.SlotError(f"--slot {slot!r} is not a slot — use A or B (or {USR_A}, {USR_B})")
            name = name_of(index)
        if disk is not None:
            d: Path | None = _disk(disk)
        else:
            try:
                d = _disk(None)
            except ObeliskError as exc:  # not on an obelisk host's disk: ROOT's records are still there
                d = None
                warnings.append(f"no boot disk, so no ESP or grubenv records: {exc}")
        sd = state_dir if state_dir is not None or disk is not None else trial_record.STATE_DIR
        found, more = bootlog.entries(disk=d, state_dir=sd, slot=name)
        warnings += more
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if as_json:
        print(json.dumps({"slot": name, "records": [e.to_json() for e in found]}, indent=2))
        return
    which = f"slot {name}" if name else "any slot"
    if not found:
        print(f"no boot records for {which}: no failed boot was recorded here")
        return
    # Plain print: the text is the host's (rich would read markup in it and wrap it).
    print(f"{len(found)} boot record{'s' if len(found) != 1 else ''} for {which}, oldest first:")
    for e in found:
        print(trial_record.describe_entry(e.record))
        if e.record.detail:
            print(f"    detail: {e.record.detail}")
        print(f"    kept in: {e.where}")


def _number(option: str, value: str | None, allowed: str) -> int | None:
    """Options are parsed here, not by click, so a bad value is one `error:` line like the rest."""
    if value is None:
        return None
    try:
        return int(value, 10)
    except ValueError:
        raise slots.SlotError(f"{option} {value!r} is not a number — use {allowed}") from None


def _successful(value: str | None) -> bool | None:
    number = _number("--successful", value, "0 or 1")
    if number is None:
        return None
    if number not in (0, 1):
        raise slots.SlotError(f"--successful {value} is invalid — use 0 or 1")
    return bool(number)


@app.command("set")
def set_cmd(
    index: str = typer.Argument(..., metavar="INDEX", help=f"Slot: {SLOT_HELP}."),
    priority: str | None = typer.Option(None, "--priority", "-P", metavar="0-15", help="Priority (0: never boots)."),
    tries: str | None = typer.Option(None, "--tries", "-T", metavar="0-15", help="Tries left."),
    successful: str | None = typer.Option(None, "--successful", "-S", metavar="0|1", help="1: booted well."),
    disk: Path | None = DiskOpt,
) -> None:
    """Set a slot's attributes, like `cgpt add -i INDEX -P -T -S`."""
    with clean_errors():
        ok = _successful(successful)
        prio, left = _number("--priority", priority, "0..15"), _number("--tries", tries, "0..15")
        slots.check_range(priority=prio, tries=left)
        s = slots.set_attrs(_disk(disk), slots.parse_slot(index), priority=prio, tries=left, successful=ok)
    print(_line(s))


@app.command()
def prioritize(
    index: str = typer.Argument(..., metavar="INDEX", help=f"Slot to put on top: {SLOT_HELP}."),
    max_priority: str | None = typer.Option(None, "--max", "-P", metavar="1-15", help="Highest priority to use."),
    friends: bool = typer.Option(False, "--friends", "-f", help="Also raise slots that had the same priority."),
    disk: Path | None = DiskOpt,
) -> None:
    """Make a slot the highest priority, keeping the others' order (`cgpt prioritize`)."""
    with clean_errors():
        top = _number("--max", max_priority, "1..15")
        slots.check_range(max_priority=top)
        for s in slots.prioritize(_disk(disk), slots.parse_slot(index), max_priority=top, friends=friends):
            print(_line(s))


@app.command("next")
def next_cmd(
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the choice without burning a try."),
    disk: Path | None = DiskOpt,
) -> None:
    """The boot-time choice (GRUB gptprio.next): burn one try of the chosen slot, print its GUID."""
    with clean_errors():
        s = slots.boot_next(_disk(disk), dry_run=dry_run)
        if s is None:
            raise slots.SlotError("no USR slot is bootable (each has priority 0, or no tries left and is not "
                                  "successful) — run 'obelisk boot set INDEX --priority 1 --successful 1'")
    print(s.uuid)


@app.command("mark-good")
def mark_good(
    slot: str | None = typer.Option(None, "--slot", metavar="INDEX", help="Slot to mark (default: the running one)."),
    disk: Path | None = DiskOpt,
) -> None:
    """After a healthy boot: successful=1, tries=0, and keep it on top."""
    with clean_errors():
        d = _disk(disk)
        index = slots.parse_slot(slot) if slot is not None else slots.running_index(d)
        if index is None:
            raise slots.SlotError(f"{d}: no slot is running or bootable — name one with --slot")
        print(_line(slots.mark_good(d, index)))


BOOT_CHECK = Path("/usr/lib/obelisk/obelisk-boot-check")


class BootCheckMissing(ObeliskError):
    """The health check is not on this system (not an obelisk host)."""


@app.command()
def check(
    dry_run: bool = typer.Option(False, "--dry-run", help="Run every check; mark, record and reboot nothing."),
    hooks_dir: list[Path] = typer.Option(None, "--hooks-dir", help="try the hooks in this folder instead of "
                                         "/usr/lib/obelisk/health.d and /etc/obelisk/health.d (repeatable)"),
    script: Path = typer.Option(BOOT_CHECK, hidden=True),
) -> None:
    """The boot's health check (docs/health.md), as obelisk-boot-check.service runs it; exit 1 when unhealthy.
    Without --dry-run a healthy check marks the running slot good, and a failing trial boot falls back."""
    with clean_errors():
        if not script.is_file():
            raise BootCheckMissing(f"{script} is not here: `obelisk boot check` runs on an obelisk host",
                                   hint="run it on the host (ssh core@HOST sudo obelisk boot check --dry-run)")
        env = {"OBELISK_BOOT_CHECK_DRY_RUN": "1" if dry_run else "0"}
        if hooks_dir:
            env["OBELISK_HEALTH_DIRS"] = " ".join(str(d) for d in hooks_dir)
        res = run(["/bin/sh", script], env=env, check=False, timeout=3600)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    raise typer.Exit(0 if res.returncode == 0 else 1)


@app.command()
def rollback(disk: Path | None = DiskOpt) -> None:
    """Make the other slot the next boot, if it is marked successful."""
    with clean_errors():
        s = slots.rollback(_disk(disk))
    print(f"next boot: slot {s.name} (partition {s.index})")


@app.command()
def repair(
    disk: Path | None = DiskOpt,
    move_backup: bool = typer.Option(False, "--move-backup", help="Move the backup GPT to the end of a grown disk."),
) -> None:
    """Rewrite a damaged primary or backup GPT from the intact copy (like `cgpt repair`)."""
    with clean_errors():
        d = _disk(disk)
        fixed = gpt.repair(d, move_backup=move_backup)
    print("\n".join(f"repaired: {p}" for p in fixed) if fixed else f"{d}: both GPT copies are intact")


if __name__ == "__main__":  # `python -m bootloader.cli` runs the same app as `obelisk boot`
    app(prog_name="obelisk boot")
