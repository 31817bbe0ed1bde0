"""The update daemon: schedule, the update run as a chain of steps, after-boot health gate, status socket.

One update run is update_engine's action chain, one step after the other, each moving the persisted
state (``state.StateMachine``, which checks every move against ``state.TRANSITIONS``):

    check     IDLE → CHECKING_FOR_UPDATE → IDLE (no update) | UPDATE_AVAILABLE
    download  → DOWNLOADING (event 13/1) → VERIFYING (event 14/1)
    finalize  → FINALIZING → UPDATED_NEED_REBOOT (event 3/1), then the reboot step
    report    any failure: → REPORTING_ERROR_EVENT (event 3/0 with the error's Omaha code) → IDLE

Every error that ends a run carries its Omaha code as data (``ApplyError.code``, ``OmahaError.code``).
The first check after a reboot carries 3/2 with the previous version, or 3/0 errorcode 44 when the
host came back on the old slot; that version is then never taken again. Checks: first a few
minutes after start, then about every 45 minutes with jitter, the server's PollInterval honoured,
doubling on errors up to 4 hours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bootloader import layout, slots
from obelisk import trial_record
from obelisk import update_conf as config
from obelisk.atomicfile import write_atomic
from obelisk.errors import ObeliskError
from obelisk.inputs import check_input
from obelisk.signing import PublicKey, SigningError
from obelisk.versions import compare_versions
from update_engine import apply as applymod
from update_engine import omaha
from update_engine.errors import ApplyError, Stopped
from update_engine.installed import host_arch
from update_engine.metrics import AgentMetrics
from update_engine.omaha import Event, OmahaError
from update_engine.omaha_client import HostInfo, Limits, OmahaClient
from update_engine.policy import Policy, load_keys
from update_engine.state import IN_FLIGHT, DaemonState, StateMachine, Status, ensure_dir
from update_engine.status_socket import StatusServer
from update_engine.transfer import Transfer, TransferFailed

log = logging.getLogger("obelisk.update")

STATE_DIR = Path("/var/lib/obelisk")
SOCKET_PATH = Path("/run/obelisk/update.sock")
KEYS_DIR = Path("/usr/share/obelisk/keys")
HEALTH_DIR = Path("/etc/obelisk/health.d")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
MACHINE_ID = Path("/etc/machine-id")
MACHINE_ID_MODE = 0o644  # like /etc/machine-id: an identifier, not a secret, but only root writes it

FIRST_CHECK = (7 * 60, 10 * 60)  # (value, fuzz): uniform in [v - f/2, v + f/2], update_engine's numbers
# The first boot after an update: the reboot lock is held until the daemon's first run gives it back
# (and reports 3/2 or the rollback), so that run comes soon, not minutes later; the rest of the fleet waits.
AFTER_UPDATE_CHECK = (20, 20)
INTERVAL = (45 * 60, 10 * 60)
MAX_BACKOFF = 4 * 3600


class DaemonError(ObeliskError, RuntimeError):
    """The daemon cannot run a check at all (bad settings, no keys); one line for the user."""


@dataclass
class Options:
    state_dir: Path = STATE_DIR
    conf: Path = config.ETC_CONF
    usr_conf: Path = config.USR_CONF
    release: Path = config.RELEASE_FILE
    lock_conf: Path | None = None
    keys_dir: Path = KEYS_DIR
    extra_keys: list[Path] = field(default_factory=list)
    disk: Path | None = None  # None: the booted disk
    health_dir: Path = HEALTH_DIR
    socket_path: Path = SOCKET_PATH
    boot_id_path: Path = BOOT_ID
    machine_id_path: Path = MACHINE_ID
    transfer: Transfer = field(default_factory=Transfer)
    omaha_timeout: float = 60.0  # the whole Omaha exchange: connect, send, read the answer
    textfile_dirs: tuple[Path, ...] = config.TEXTFILE_DIRS  # where to look for node-exporter's textfile folder


def fuzz(value: float, spread: float) -> float:
    return max(0.0, value + random.uniform(-spread / 2, spread / 2))


def next_interval(failures: int, poll_interval: int = 0) -> float:
    """Seconds to the next check: PollInterval wins; errors double the interval up to 4 h."""
    if poll_interval > 0:
        return float(poll_interval)
    if failures:
        return fuzz(min(INTERVAL[0] * 2 ** min(failures, 8), MAX_BACKOFF), INTERVAL[1])
    return fuzz(*INTERVAL)


def sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify): one datagram to $NOTIFY_SOCKET; no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)  # a status line is never worth stalling an update for
        s.sendto(message.encode(), addr)


def _notify_state(st: DaemonState) -> None:
    sd_notify(f"STATUS={st.state}" + (f" {st.new_version}" if st.new_version else ""))


def _read_text(path: Path, what: str) -> str:
    """A small file's text, "" when it is absent; a FIFO or folder in its place is an error, not a hang."""
    if not os.path.lexists(path):
        return ""
    check_input(path, what)
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _check_optional(path: Path | None, what: str) -> None:
    """A settings file that may be absent, but when present must be a regular file (a FIFO would hang)."""
    if path is not None and os.path.lexists(path):
        check_input(path, what)


@dataclass
class Run:
    """What one update run works with (read once at its start)."""

    conf: config.UpdateConf
    rel: dict[str, str]
    disk: Path
    keys: list[PublicKey]
    client: OmahaClient
    host: HostInfo  # what every request says about this host
    interactive: bool = False
    reboot: Callable[[], None] | None = None

    @property
    def version(self) -> str:
        return self.rel["VERSION"]


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.machine = StateMachine(opts.state_dir, notify=self._notify)
        self.metrics = AgentMetrics(self.machine.st.state, search=opts.textfile_dirs)
        self.stop_event = threading.Event()
        self.check_now = threading.Event()
        self.poll_interval = 0

    def _notify(self, st: DaemonState) -> None:
        _notify_state(st)
        self.metrics.observe(st)

    @property
    def st(self) -> DaemonState:
        """The current state (read it; change it only through ``self.machine``)."""
        return self.machine.st

    def status(self) -> dict:
        return self.machine.public()

    def request_check(self) -> None:
        self.check_now.set()

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    # ------------------------------------------------------------ environment

    def _settings(self) -> tuple[config.UpdateConf, dict[str, str]]:
        for path, what in ((self.opts.conf, "settings file"), (self.opts.usr_conf, "settings file"),
                           (self.opts.release, "release file"), (self.opts.lock_conf, "settings file")):
            _check_optional(path, what)
        conf = config.load(self.opts.conf, self.opts.usr_conf, self.opts.release)
        self.metrics.configure(conf, self.st)
        rel = config.read_release(self.opts.release)
        if not rel.get("VERSION"):
            raise DaemonError(f"{self.opts.release} has no VERSION=: cannot tell which version this host runs")
        if not conf.server:
            raise DaemonError(f"no update server: set SERVER= in {self.opts.conf}")
        return conf, rel

    def _keys(self) -> list[PublicKey]:
        try:
            keys = load_keys(self.opts.keys_dir, self.opts.extra_keys)
        except SigningError as exc:
            raise DaemonError(str(exc)) from None
        if not keys:
            raise DaemonError(f"no trusted keys in {self.opts.keys_dir}: this host cannot verify any payload")
        return keys

    def _disk(self) -> Path:
        if self.opts.disk is not None:
            return check_input(self.opts.disk, "disk", block_device=True)
        try:
            return slots.find_boot_disk()
        except slots.SlotError as exc:
            raise DaemonError(f"cannot find the boot disk: {exc} (pass --disk)") from None

    def _boot_id(self) -> str:
        return _read_text(self.opts.boot_id_path, "boot id file") or "unknown"

    def machine_id(self) -> str:
        """This host's id for the server: /etc/machine-id, else one made once and kept in the state dir."""
        mid = _read_text(self.opts.machine_id_path, "machine id file")
        if mid:
            return mid
        path = self.opts.state_dir / "machine-id"  # a host without /etc/machine-id still needs a stable id
        mid = _read_text(path, "machine id file")
        if not mid:
            mid = uuid.uuid4().hex
            try:
                ensure_dir(self.opts.state_dir, 0o700)
                write_atomic(path, (mid + "\n").encode(), mode=MACHINE_ID_MODE)
            except OSError as exc:
                raise DaemonError(f"cannot write {path}: {exc.strerror}") from None
        return mid

    def _host_info(self, conf: config.UpdateConf, rel: dict[str, str]) -> HostInfo:
        version = rel["VERSION"]
        arch = rel.get("ARCH") or host_arch()
        return HostInfo(appid=conf.app_id or rel.get("APPID") or config.DEFAULT_APPID, version=version,
                        track=conf.group, machineid=self.machine_id(), bootid="{" + self._boot_id() + "}",
                        board=omaha.board_for(arch), alephversion=self.st.aleph_version or version,
                        os_sp=f"{version}_{platform.machine()}")

    def _client(self, conf: config.UpdateConf) -> OmahaClient:
        limits = Limits(deadline=self.opts.omaha_timeout, connect_timeout=self.opts.transfer.connect_timeout)
        return OmahaClient(conf.server, proxy=conf.proxy, limits=limits)

    def _coordinator(self, conf: config.UpdateConf):  # noqa: ANN202 - the reboot package's type
        from obelisk import lock_conf as lockconfig
        from update_engine.reboot import coordinator_from_config

        lock_conf = None
        if self.opts.lock_conf is not None:
            lock_conf = lockconfig.load(self.opts.lock_conf, Path("/nonexistent"))
        return coordinator_from_config(conf, lock_conf)

    def _event(self, run: Run, ev: Event) -> None:
        run.client.event(run.host, ev)

    # ------------------------------------------------------------ after a reboot

    def _health_gate(self) -> str | None:
        """None when healthy, else why not. systemd must reach `running`; every hook must exit 0."""
        from obelisk.tools import ToolError, run

        if self.opts.disk is None and Path("/run/systemd/system").is_dir():
            try:
                res = run(["systemctl", "is-system-running", "--wait"], check=False, timeout=600)
            except ToolError as exc:
                return f"systemd state unknown: {exc}"
            if res.stdout.strip() != "running":
                return f"systemd is {res.stdout.strip() or 'unknown'}, not running"
        if self.opts.health_dir.is_dir():
            for hook in sorted(self.opts.health_dir.iterdir()):
                if not (hook.is_file() and os.access(hook, os.X_OK)):
                    continue
                try:
                    res = run([str(hook)], check=False, timeout=300)
                except ToolError as exc:
                    return f"health hook {hook.name}: {exc}"
                if res.returncode != 0:
                    last = (res.stderr or res.stdout).strip().splitlines()
                    return f"health hook {hook.name} failed (exit {res.returncode})" + (f": {last[-1]}" if last else "")
        return None

    def _staged_slot(self, disk: Path) -> slots.Slot | None:
        index = layout.SLOT_INDEX.get(self.st.staged_slot or "")
        return next((s for s in slots.read_slots(disk) if s.index == index), None)

    @staticmethod
    def _trial_pending(s: slots.Slot | None) -> bool:
        return s is not None and s.priority > 0 and s.tries > 0 and not s.successful

    def after_boot(self, conf: config.UpdateConf, rel: dict[str, str], disk: Path) -> None:
        """Once per boot after staging: mark the new slot good after the gate, or note the rollback."""
        m, st = self.machine, self.st
        current = rel["VERSION"]
        if st.current_version != current:
            m.record(current_version=current)
        if not st.aleph_version:
            m.record(aleph_version=current)
        if st.staged_version and st.staged_boot_id != self._boot_id():
            if compare_versions(current, st.staged_version) == 0:
                why = self._health_gate()
                if why:
                    m.move(Status.IDLE, last_error=f"new version {current} is not healthy yet: {why}")
                    raise DaemonError(self.st.last_error or why)
                index = slots.running_index(disk)
                if index is not None:
                    slots.mark_good(disk, index)
                log.info("marked slot %s good after a healthy boot into %s", index, current)
                m.move(Status.IDLE, staged_version=None, staged_boot_id=None, staged_slot=None, new_version="",
                       progress=0.0, release_lock_pending=True, last_error=None)
            else:
                staged = self._staged_slot(disk)
                if self._trial_pending(staged):
                    # Rebooted without the trial being tried (another boot entry was chosen): still pending.
                    m.move(Status.UPDATED_NEED_REBOOT, staged_boot_id=self._boot_id())
                    return
                if staged is None or staged.priority == 0:
                    # Staging was cut short before postinstall finished: nothing was tried, nothing to report.
                    log.warning("staging of %s was interrupted before it finished; it is taken again",
                                st.staged_version)
                    m.move(Status.IDLE, staged_version=None, staged_boot_id=None, staged_slot=None,
                           previous_version="", new_version="", progress=0.0)
                    return
                why = trial_record.reason_for(self.opts.state_dir, st.staged_version)
                log.error("came back on %s instead of %s: %s", current, st.staged_version, why)
                failed = sorted(set(st.failed_versions) | {st.staged_version})
                m.move(Status.IDLE, failed_versions=failed, staged_version=None, staged_boot_id=None,
                       staged_slot=None, new_version="", progress=0.0, release_lock_pending=True,
                       rollback_reason=why,
                       last_error=f"rolled back: {st.staged_version} did not boot ({why}); it will not be taken again")
        if st.release_lock_pending:
            try:
                self._coordinator(conf).release_after_boot()
                m.record(release_lock_pending=False)
            except Exception as exc:  # the lock service may be down; retried on the next run
                log.warning("could not give the reboot lock back yet: %s", exc)

    # ------------------------------------------------------------ one run

    def _prepare(self, interactive: bool, reboot: Callable[[], None] | None) -> Run:
        conf, rel = self._settings()
        disk = self._disk()
        keys = self._keys()
        self.after_boot(conf, rel, disk)
        st = self.st
        if st.staged_version and st.state != Status.UPDATED_NEED_REBOOT and st.staged_boot_id == self._boot_id() \
                and self._trial_pending(self._staged_slot(disk)):
            # Killed between postinstall and saving the state: the GPT says the stage completed.
            self.machine.move(Status.UPDATED_NEED_REBOOT, progress=1.0)
        return Run(conf, rel, disk, keys, self._client(conf), self._host_info(conf, rel), interactive, reboot)

    def run_once(self, *, interactive: bool = False, reboot: Callable[[], None] | None = None) -> int:
        """One update run; 0 when up to date or staged, 1 when it failed (the error is in the status)."""
        if self.machine.state in IN_FLIGHT:
            # The last run was stopped, killed or crashed mid-way: this one starts from the beginning
            # (the download resumes from its checkpoint; the GPT says whether a stage completed).
            self.machine.move(Status.IDLE)
        try:
            run = self._prepare(interactive, reboot)
        except ObeliskError as exc:  # settings, keys, disk, the health gate: nothing to report to the server
            self.machine.record(last_error=str(exc))
            log.error("%s", exc)
            return 1
        if self.st.state == Status.UPDATED_NEED_REBOOT and self.st.staged_boot_id == self._boot_id():
            # Already staged in this boot: like update_engine, only ping, then see to the reboot.
            run.client.ping(run.host)
            self._reboot_step(run)
            return 0
        try:
            upd = self._check(run)
            if upd is None:
                return 0
            result = self._download(run, upd)
        except Stopped as exc:
            self.machine.record(last_error=str(exc))  # progress is kept; the next run resumes it
            return 1
        except (ApplyError, OmahaError) as exc:
            return self._report(run, exc)
        self._finalize(run, result)
        self._reboot_step(run)
        return 0

    # ------------------------------------------------------------ the steps

    def _boot_event(self, run: Run) -> Event:
        """What the first check after a boot reports about the last update: 3/2, or 3/0/44 after a rollback."""
        prev = self.st.previous_version
        if prev and compare_versions(prev, run.version) == 0:
            return Event(omaha.EVENT_UPDATE_COMPLETE, omaha.RESULT_ERROR, omaha.ERR_ROLLBACK,
                         reason=self.st.rollback_reason or None)
        return Event(omaha.EVENT_UPDATE_COMPLETE, omaha.RESULT_SUCCESS_REBOOT,
                     previousversion="0.0.0.0" if prev is None else prev)

    def _check(self, run: Run) -> omaha.Update | None:
        """CHECKING_FOR_UPDATE: the updatecheck; IDLE when there is nothing (new) to take."""
        m = self.machine
        events = [self._boot_event(run)]
        m.move(Status.CHECKING_FOR_UPDATE)
        resp = run.client.check(run.host, events, interactive=run.interactive)
        self.poll_interval = resp.poll_interval
        m.record(previous_version="", last_checked=time.time())
        trial_record.mark_sent(self.opts.state_dir)  # reported: never sent twice, kept for `boot status`
        upd = resp.update
        if upd is None:
            m.move(Status.IDLE, consecutive_failures=0, last_error=None, new_version="", progress=0.0)
            log.info("no update (running %s)", run.version)
            return None
        if upd.version in self.st.failed_versions:
            log.warning("server offers %s, which rolled back on this host before: waiting for a newer one",
                        upd.version)
            m.move(Status.IDLE, consecutive_failures=0, new_version="",
                   last_error=f"{upd.version} rolled back here before; waiting for a newer release")
            return None
        m.move(Status.UPDATE_AVAILABLE, new_version=upd.version, new_size=upd.size, progress=0.0)
        return upd

    def _download(self, run: Run, upd: omaha.Update) -> applymod.Result:
        """DOWNLOADING → VERIFYING → FINALIZING: the apply, trying each URL the server listed in turn."""
        m = self.machine
        t = self.opts.transfer
        transfer = Transfer(**{**t.__dict__, "bandwidth": run.conf.bandwidth_bytes or t.bandwidth,
                               "proxy": run.conf.proxy or t.proxy})
        policy = Policy(app_id=run.conf.app_id or run.rel.get("APPID"), arch=run.rel.get("ARCH") or host_arch(),
                        current_version=run.version, expected_size=upd.size, expected_sha256=upd.sha256,
                        expected_version=upd.version or None)
        self._event(run, Event(omaha.EVENT_DOWNLOAD_STARTED, omaha.RESULT_SUCCESS))
        m.move(Status.DOWNLOADING)
        downloaded = threading.Event()
        appliers: list[applymod.Applier] = []

        def on_phase(phase: str) -> None:
            if phase == "verifying" and not downloaded.is_set():
                downloaded.set()
                self._event(run, Event(omaha.EVENT_DOWNLOAD_FINISHED, omaha.RESULT_SUCCESS))
                m.move(Status.VERIFYING, progress=1.0)
            elif phase == "finalizing":
                # Recorded before postinstall touches the GPT, so a kill in between is recognised later.
                m.move(Status.FINALIZING, previous_version=run.version, staged_version=upd.version,
                       staged_boot_id=self._boot_id(), staged_slot=appliers[-1].slot_name)

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase == "downloading":
                m.progress(done / total if total else 0.0)
                self.metrics.download_progress(done, self.st)

        last: TransferFailed | None = None
        for url in upd.urls:  # update_engine moves on to the next URL when one fails
            appliers.append(applymod.Applier(url, run.disk, run.keys, policy=policy, transfer=transfer,
                                             state_dir=self.opts.state_dir, on_progress=on_progress,
                                             should_stop=self.should_stop, on_phase=on_phase, urls_only=True))
            try:
                return appliers[-1].run()
            except TransferFailed as exc:
                last = exc
        assert last is not None
        raise last

    def _finalize(self, run: Run, result: applymod.Result) -> None:
        """UPDATED_NEED_REBOOT: the slot is staged; the previous version is kept for the report after the boot."""
        self.machine.move(Status.UPDATED_NEED_REBOOT, previous_version=run.version, staged_version=result.version,
                          staged_boot_id=self._boot_id(), staged_slot=result.slot, progress=1.0,
                          consecutive_failures=0, last_error=None)
        self._event(run, Event(omaha.EVENT_UPDATE_COMPLETE, omaha.RESULT_SUCCESS))

    def _report(self, run: Run, exc: ApplyError | OmahaError) -> int:
        """REPORTING_ERROR_EVENT → IDLE: the error event carries the error's own Omaha code."""
        m = self.machine
        log.error("update failed (code %s): %s", exc.code, exc)
        m.move(Status.REPORTING_ERROR_EVENT, last_error=str(exc), last_error_code=exc.code,
               consecutive_failures=self.st.consecutive_failures + 1)
        self._event(run, Event(omaha.EVENT_UPDATE_COMPLETE, omaha.RESULT_ERROR, exc.code,
                               reason=trial_record.sanitize(str(exc))))
        m.move(Status.IDLE, progress=0.0)
        return 1

    def _reboot_step(self, run: Run) -> None:
        try:
            coord = self._coordinator(run.conf)
        except Exception as exc:  # bad lock.conf: the update stays staged; say why
            self.machine.record(last_error=f"cannot coordinate the reboot: {exc}")
            return
        coord.wait_and_reboot(run.reboot or _systemctl_reboot, self.should_stop)

    # ------------------------------------------------------------ long-running service

    def first_check_delay(self) -> tuple[float, float]:
        """(value, fuzz) of the first check of this daemon start: soon after a reboot into (or back from)
        a staged update, update_engine's few minutes otherwise."""
        st = self.st
        if st.release_lock_pending or (st.staged_version and st.staged_boot_id != self._boot_id()):
            return AFTER_UPDATE_CHECK
        return FIRST_CHECK

    def serve_forever(self, *, first_check: float | None = None) -> None:
        server = StatusServer(self.opts.socket_path, self)
        threading.Thread(target=server.serve_forever, daemon=True, name="status-socket").start()

        def stop(*_: object) -> None:
            self.stop_event.set()
            self.check_now.set()  # wake the scheduler's wait

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        sd_notify("READY=1")
        with contextlib.suppress(ObeliskError):
            self._settings()  # the metrics textfile from the start, not only after the first run
        wait = fuzz(*self.first_check_delay()) if first_check is None else first_check
        try:
            while not self.stop_event.is_set():
                self.check_now.wait(timeout=min(wait, threading.TIMEOUT_MAX))
                if self.stop_event.is_set():
                    break
                interactive = self.check_now.is_set()
                self.check_now.clear()
                try:
                    rc = self.run_once(interactive=interactive)
                except Exception as exc:  # a bug must not stop updates for good: log, back off, try again
                    log.exception("update run failed unexpectedly")
                    self.machine.move(Status.IDLE, last_error=f"internal error: {exc}",
                                      consecutive_failures=self.st.consecutive_failures + 1)
                    rc = 1
                wait = next_interval(self.st.consecutive_failures if rc else 0, self.poll_interval)
                log.info("next check in %.0f s", wait)
        finally:
            sd_notify("STOPPING=1")
            server.shutdown()
            server.server_close()
            with contextlib.suppress(OSError):
                self.opts.socket_path.unlink()


def _systemctl_reboot() -> None:
    from obelisk.tools import run

    run(["systemctl", "reboot"])
