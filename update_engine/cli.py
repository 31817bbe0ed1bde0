"""`obelisk update`: apply, status, check, watch, daemon (parse, call, print).

`obelisk update serve` belongs to the update server (``update_server.cli.serve``); the root CLI mounts
it into this group, so a host never imports the server unless that command runs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TransferSpeedColumn

from bootloader import layout, slots
from obelisk import update_conf as config
from obelisk.errors import clean_errors, fail
from update_engine.apply import Applier
from update_engine.daemon import KEYS_DIR, SOCKET_PATH, STATE_DIR, Daemon, Options
from update_engine.policy import Overrides, load_keys
from update_engine.state import STATE_FILE, load_state
from update_engine.status_socket import ask
from update_engine.transfer import Transfer

app = typer.Typer(help="Stage updates into the passive USR slot; run the update daemon or server.",
                  no_args_is_help=True)
err = Console(stderr=True)


def _keys(key: list[Path] | None) -> list:
    with clean_errors():
        keys = load_keys(None, key) if key else load_keys(KEYS_DIR)
    if not keys:
        fail(f"no trusted keys in {KEYS_DIR}: pass --key PUB (the release's public key)")
    return keys


def _note(text: str) -> None:
    err.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)


def _slot(value: str | None) -> int | None:
    if value is None:
        return None
    index = layout.parse_slot(value)
    if index is None:
        fail(f"--slot {value!r}: use A or B")
    return index


@app.command("apply")
def apply_cmd(
    source: str = typer.Argument(..., help="payload file or http(s):// URL"),
    disk: Path | None = typer.Option(None, help="disk or disk image to stage into (default: the booted disk)"),
    slot: str | None = typer.Option(None, help="A or B (default: the passive slot)"),
    key: list[Path] | None = typer.Option(None, help="trusted public key (repeatable; default: the image's keys)"),
    state_dir: Path | None = typer.Option(None, help="keep progress here so an interrupted apply resumes"),
    newer_than: str | None = typer.Option(None, help="compare with this version instead of the one the target runs"),
    app_id: str | None = typer.Option(None, help="accept this app id instead of the one the target runs"),
    arch: str | None = typer.Option(None, help="accept this arch instead of the one the target runs"),
    allow_downgrade: bool = typer.Option(False, "--allow-downgrade",
                                         help="accept a payload not newer than what the target runs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="verify the payload and the policy, write nothing"),
    adaptive: bool = typer.Option(False, "--adaptive", help="copy the chunks the disk already has and fetch only "
                                  "the others by HTTP Range (needs a payload with a chunk index)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Stage a payload into the passive slot of a disk (or a disk image), verified, then marked for a trial boot.

    The payload must be for the app id and arch the target runs and newer than its version, as the
    daemon requires: read from the running host, or on another disk from its last good slot.
    """
    keys = _keys(key)
    index = _slot(slot)
    overrides = Overrides(newer_than=newer_than, app_id=app_id, arch=arch, allow_downgrade=allow_downgrade)
    with clean_errors():
        if disk is None:
            disk = slots.find_boot_disk()
            if state_dir is None and not dry_run:
                state_dir = STATE_DIR
        prog = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
                        TransferSpeedColumn(), console=err, disable=as_json)
        tasks: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if not tasks:
                prog.start()  # only once bytes flow, so a refusal prints nothing but its error line
            if phase not in tasks:
                tasks[phase] = prog.add_task(phase, total=total)
            prog.update(tasks[phase], completed=done)

        def on_figures(f) -> None:  # an adaptive apply: what came from the disk, what over the network
            if "downloading" in tasks:
                prog.update(tasks["downloading"], description=f"reused {f.reused / 1e6:.1f} MB, fetched "
                            f"{f.fetched / 1e6:.1f} MB")

        try:
            result = Applier(source, disk, keys, slot=index, overrides=overrides,
                             state_dir=None if dry_run else state_dir, on_progress=on_progress,
                             on_note=_note, adaptive=adaptive, on_figures=on_figures,
                             dry_run=dry_run).run()
        finally:
            if tasks:
                prog.stop()
    if as_json:
        print(json.dumps(result.__dict__, indent=2))
    elif not result.staged:
        print(f"dry run: {result.version} passes every check and would be staged into slot {result.slot} of "
              f"{result.disk}; nothing was written")
    else:
        resumed = f" (resumed at {result.resumed_from} bytes)" if result.resumed_from else ""
        print(f"staged {result.version} into slot {result.slot} of {result.disk}{resumed}: "
              "it boots next for one trial")
        t = result.transfer
        if t.get("mode") == "adaptive":
            print(f"adaptive: reused {t['reused']:,} bytes, fetched {t['fetched']:,}, saved {t['saved']:,} "
                  f"of {t['total']:,}")


def _status(socket_path: Path, state_dir: Path) -> tuple[dict, bool]:
    try:
        return ask(socket_path, "status"), True
    except OSError:
        if not (state_dir / STATE_FILE).exists():
            fail(f"no update daemon at {socket_path} and no state in {state_dir}: is obelisk-update.service running?")
        return load_state(state_dir).public(), False


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    socket_path: Path = typer.Option(SOCKET_PATH, "--socket", help="the daemon's status socket"),
    state_dir: Path = typer.Option(STATE_DIR, help="read the saved state here when no daemon answers"),
) -> None:
    """Show what the update daemon is doing (from its socket, or its saved state)."""
    st, live = _status(socket_path, state_dir)
    if "error" in st:
        fail(st["error"])
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return
    checked = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["last_checked"])) if st.get("last_checked") \
        else "never"
    print(f"state:           {st['state']}{'' if live else ' (daemon not running; saved state)'}")
    print(f"current version: {st.get('current_version') or '?'}")
    if st.get("new_version"):
        print(f"new version:     {st['new_version']} ({st.get('progress', 0) * 100:.0f}%)")
    print(f"last checked:    {checked}")
    if st.get("last_error"):
        print(f"last error:      {st['last_error']}")


@app.command()
def check(socket_path: Path = typer.Option(SOCKET_PATH, "--socket", help="the daemon's status socket")) -> None:
    """Ask the daemon to check for an update now."""
    try:
        out = ask(socket_path, "check")
    except OSError as exc:
        fail(f"no update daemon at {socket_path} ({exc.strerror or exc}): start obelisk-update.service")
    if "error" in out:
        fail(out["error"])
    print("update check requested")


@app.command()
def watch(
    socket_path: Path = typer.Option(SOCKET_PATH, "--socket", help="the daemon's status socket"),
    timeout: float = typer.Option(0, help="give up after this many seconds (0: never)"),
) -> None:
    """Follow the daemon's progress until the update is staged or the run ends."""
    start = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), console=err) as prog:
        task = prog.add_task("waiting", total=1.0)
        seen_active = False
        while True:
            try:
                st = ask(socket_path, "status")
            except OSError as exc:
                fail(f"no update daemon at {socket_path} ({exc.strerror or exc})")
            state = st.get("state", "?")
            prog.update(task, description=f"{state} {st.get('new_version') or ''}".strip(),
                        completed=st.get("progress", 0.0))
            if state not in ("IDLE", "UPDATED_NEED_REBOOT"):
                seen_active = True
            if state == "UPDATED_NEED_REBOOT" or (seen_active and state == "IDLE"):
                break
            if timeout and time.monotonic() - start > timeout:
                break
            time.sleep(0.5)
    if st.get("last_error"):
        fail(st["last_error"], code=1)
    print(st.get("state"))


@app.command()
def daemon(
    once: bool = typer.Option(False, "--once", help="one update run, then exit (tests, VM scenarios, cron)"),
    disk: Path | None = typer.Option(None, help="disk or disk image (default: the booted disk)"),
    state_dir: Path = typer.Option(STATE_DIR, help="persisted state and download progress"),
    conf: Path = typer.Option(config.ETC_CONF, help="update.conf (over /usr/share/obelisk/update.conf)"),
    usr_conf: Path = typer.Option(config.USR_CONF, hidden=True),
    release: Path = typer.Option(config.RELEASE_FILE, help="release file naming VERSION and APPID"),
    keys_dir: Path = typer.Option(KEYS_DIR, help="directory of trusted *.pub keys"),
    key: list[Path] | None = typer.Option(None, help="an extra trusted public key (repeatable)"),
    lock_conf: Path | None = typer.Option(None, help="lock.conf (default /etc/obelisk over /usr/share/obelisk)"),
    health_dir: Path = typer.Option(Path("/etc/obelisk/health.d"), help="health hooks run after a new boot"),
    socket_path: Path = typer.Option(SOCKET_PATH, "--socket", help="status socket"),
    boot_id_file: Path = typer.Option(Path("/proc/sys/kernel/random/boot_id"), hidden=True),
    machine_id_file: Path = typer.Option(Path("/etc/machine-id"), hidden=True),
    first_check: float | None = typer.Option(None, hidden=True, help="seconds to the first check"),
    low_speed_time: float = typer.Option(90.0, hidden=True),
    retries: int = typer.Option(20, hidden=True),
    retry_delay: float = typer.Option(2.0, hidden=True),
    checkpoint_bytes: int = typer.Option(16 << 20, hidden=True),
) -> None:
    """Run the update daemon (a systemd service), or one update run with --once."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    transfer = Transfer(low_speed_time=low_speed_time, retries=retries, retry_delay=retry_delay,
                        checkpoint_bytes=checkpoint_bytes)
    opts = Options(state_dir=state_dir, conf=conf, usr_conf=usr_conf, release=release, lock_conf=lock_conf,
                   keys_dir=keys_dir, extra_keys=list(key or []), disk=disk, health_dir=health_dir,
                   socket_path=socket_path, boot_id_path=boot_id_file, machine_id_path=machine_id_file,
                   transfer=transfer)
    with clean_errors():
        d = Daemon(opts)
        if once:
            rc = d.run_once(interactive=True, reboot=None)
            st = d.status()
            if rc:
                fail(st.get("last_error") or "update run failed", code=1)
            print(f"{st['state']} {st.get('new_version') or st.get('current_version') or ''}".strip())
            return
        d.serve_forever(first_check=first_check)


if __name__ == "__main__":
    app()
