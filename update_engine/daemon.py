"""The update daemon: schedule, state machine, Omaha conversation, after-boot health gate, status socket.

One update run walks IDLE → CHECKING_FOR_UPDATE → UPDATE_AVAILABLE → DOWNLOADING → VERIFYING →
FINALIZING → UPDATED_NEED_REBOOT, or REPORTING_ERROR_EVENT → IDLE, and posts the events Flatcar
posts (13/1, 14/1, 3/1; 3/0 with an error code on failure). The first check after a reboot carries
3/2 with the previous version, or 3/0 errorcode 44 when the host came back on the old slot; that
version is then never taken again. Checks: first a few minutes after start, then about every
45 minutes with jitter, the server's PollInterval honoured, doubling on errors up to 4 hours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import signal
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bootloader import slots
from obelisk import update_conf as config
from obelisk.errors import ObeliskError
from obelisk.signing import PublicKey, SigningError, load_public_key, load_trusted_keys
from obelisk.versions import compare_versions
from update_engine import apply as applymod
from update_engine import omaha
from update_engine.omaha import Event
from update_engine.state import DaemonState, Status, load_state, save_state

log = logging.getLogger("obelisk.update")

STATE_DIR = Path("/var/lib/obelisk")
SOCKET_PATH = Path("/run/obelisk/update.sock")
KEYS_DIR = Path("/usr/share/obelisk/keys")
HEALTH_DIR = Path("/etc/obelisk/health.d")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
MACHINE_ID = Path("/etc/machine-id")

FIRST_CHECK = (7 * 60, 10 * 60)  # (value, fuzz): uniform in [v - f/2, v + f/2], update_engine's numbers
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
    transfer: applymod.Transfer = field(default_factory=applymod.Transfer)
    omaha_timeout: float = 60.0


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


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self.check_now = threading.Event()
        self.st: DaemonState = load_state(opts.state_dir)
        self.poll_interval = 0
        self._last_save = 0.0

    # ------------------------------------------------------------ state

    def set_state(self, state: Status, **kw: object) -> None:
        with self.lock:
            self.st.state = state
            for k, v in kw.items():
                setattr(self.st, k, v)
            save_state(self.opts.state_dir, self.st)
        sd_notify(f"STATUS={state}" + (f" {self.st.new_version}" if self.st.new_version else ""))
        log.info("state %s", state)

    def status(self) -> dict:
        with self.lock:
            return self.st.public()

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    # ------------------------------------------------------------ environment

    def _settings(self) -> tuple[config.UpdateConf, dict[str, str]]:
        try:
            conf = config.load(self.opts.conf, self.opts.usr_conf, self.opts.release)
        except config.UpdateConfigError as exc:
            raise DaemonError(str(exc)) from None
        rel = config.read_release(self.opts.release)
        if not rel.get("VERSION"):
            raise DaemonError(f"{self.opts.release} has no VERSION=: cannot tell which version this host runs")
        if not conf.server:
            raise DaemonError(f"no update server: set SERVER= in {self.opts.conf}")
        return conf, rel

    def _keys(self) -> list[PublicKey]:
        try:
            keys = load_trusted_keys(self.opts.keys_dir) + [load_public_key(p) for p in self.opts.extra_keys]
        except SigningError as exc:
            raise DaemonError(str(exc)) from None
        if not keys:
            raise DaemonError(f"no trusted keys in {self.opts.keys_dir}: this host cannot verify any payload")
        return keys

    def _disk(self) -> Path:
        if self.opts.disk is not None:
            return self.opts.disk
        try:
            return slots.find_boot_disk()
        except (slots.SlotError, OSError) as exc:
            raise DaemonError(f"cannot find the boot disk: {exc} (pass --disk)") from None

    def _boot_id(self) -> str:
        return _read_text(self.opts.boot_id_path) or "unknown"

    def _machine_id(self) -> str:
        mid = _read_text(self.opts.machine_id_path)
        if mid:
            return mid
        path = self.opts.state_dir / "machine-id"  # a host without /etc/machine-id still needs a stable id
        mid = _read_text(path)
        if not mid:
            mid = uuid.uuid4().hex
            self.opts.state_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(mid + "\n")
        return mid

    def _coordinator(self, conf: config.UpdateConf):  # noqa: ANN202 - the reboot package's type
        from obelisk import lock_conf as lockconfig
        from update_engine.reboot import coordinator_from_config

        lock_conf = None
        if self.opts.lock_conf is not None:
            lock_conf = lockconfig.load(self.opts.lock_conf, Path("/nonexistent"))
        return coordinator_from_config(conf, lock_conf)

    # ------------------------------------------------------------ Omaha

    def _request(self, conf: config.UpdateConf, rel: dict[str, str], *, ping: bool, updatecheck: bool,
                 events: list[Event], interactive: bool = False) -> omaha.Response | None:
        arch = rel.get("ARCH") or _host_arch()
        app = omaha.AppRequest(
            appid=conf.app_id or rel.get("APPID") or config.DEFAULT_APPID, version=rel["VERSION"],
            track=conf.group, machineid=self._machine_id(), bootid="{" + self._boot_id() + "}",
            board=omaha.board_for(arch), alephversion=self.st.aleph_version or rel["VERSION"],
            ping=ping, updatecheck=updatecheck, events=events)
        req = omaha.Request(app, installsource="ondemandupdate" if interactive else "scheduler",
                            os_sp=f"{rel['VERSION']}_{platform.machine()}")
        body = omaha.build_request(req)
        proxies = {"http": conf.proxy, "https": conf.proxy} if conf.proxy else None
        try:
            r = requests.post(conf.server, data=body, headers={"Content-Type": "text/xml"}, proxies=proxies,
                              timeout=(self.opts.transfer.connect_timeout, self.opts.omaha_timeout))
        except requests.RequestException as exc:
            raise omaha.OmahaError(f"cannot reach update server {conf.server}: {applymod._reason(exc)}",
                                   omaha.ERR_HTTP) from None
        if r.status_code >= 400:
            raise omaha.OmahaError(f"update server {conf.server} answered HTTP {r.status_code}",
                                   omaha.ERR_OMAHA_HTTP_BASE + min(r.status_code, 999))
        if not updatecheck:
            return None  # events are best effort, as in update_engine: any 2xx is fine
        return omaha.parse_response(r.content)

    def _event(self, conf: config.UpdateConf, rel: dict[str, str], ev: Event) -> None:
        try:
            self._request(conf, rel, ping=False, updatecheck=False, events=[ev])
        except omaha.OmahaError as exc:
            log.warning("could not report event %s/%s: %s", ev.type, ev.result, exc)

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

    def after_boot(self, conf: config.UpdateConf, rel: dict[str, str], disk: Path) -> None:
        """Once per boot after staging: mark the new slot good after the gate, or note the rollback."""
        st = self.st
        current = rel["VERSION"]
        if st.current_version != current:
            self.set_state(Status(st.state), current_version=current)
        if not st.aleph_version:
            self.set_state(Status(st.state), aleph_version=current)
        if st.staged_version and st.staged_boot_id != self._boot_id():
            if compare_versions(current, st.staged_version) == 0:
                why = self._health_gate()
                if why:
                    self.set_state(Status.IDLE, last_error=f"new version {current} is not healthy yet: {why}")
                    raise DaemonError(self.st.last_error or why)
                index = slots.running_index(disk)
                if index is not None:
                    slots.mark_good(disk, index)
                log.info("marked slot %s good after a healthy boot into %s", index, current)
                self.set_state(Status.IDLE, staged_version=None, staged_boot_id=None, staged_slot=None,
                               new_version="", progress=0.0, release_lock_pending=True, last_error=None)
            else:
                staged = self._staged_slot(disk)
                if staged is not None and staged.priority > 0 and staged.tries > 0 and not staged.successful:
                    # Rebooted without the trial being tried (another boot entry was chosen): still pending.
                    self.set_state(Status.UPDATED_NEED_REBOOT, staged_boot_id=self._boot_id())
                    return
                if staged is None or staged.priority == 0:
                    # Staging was cut short before postinstall finished: nothing was tried, nothing to report.
                    log.warning("staging of %s was interrupted before it finished; it is taken again",
                                st.staged_version)
                    self.set_state(Status.IDLE, staged_version=None, staged_boot_id=None, staged_slot=None,
                                   previous_version="", new_version="", progress=0.0)
                    return
                log.error("came back on %s instead of %s: the new slot did not boot", current, st.staged_version)
                failed = sorted(set(st.failed_versions) | {st.staged_version})
                self.set_state(Status.IDLE, failed_versions=failed, staged_version=None, staged_boot_id=None,
                               staged_slot=None, new_version="", progress=0.0, release_lock_pending=True,
                               last_error=f"rolled back: {st.staged_version} did not boot; it will not be "
                                          "taken again")
        if st.release_lock_pending:
            try:
                self._coordinator(conf).release_after_boot()
                self.set_state(Status(st.state), release_lock_pending=False)
            except Exception as exc:  # the lock service may be down; retried on the next run
                log.warning("could not give the reboot lock back yet: %s", exc)

    def _staged_slot(self, disk: Path) -> slots.Slot | None:
        index = {"A": slots.USR_A, "B": slots.USR_B}.get(self.st.staged_slot or "")
        return next((s for s in slots.read_slots(disk) if s.index == index), None)

    # ------------------------------------------------------------ one run

    def run_once(self, *, interactive: bool = False, reboot: Callable[[], None] | None = None) -> int:
        """One update run; 0 when up to date or staged, 1 when it failed (the error is in the status)."""
        try:
            conf, rel = self._settings()
            disk = self._disk()
            keys = self._keys()
            self.after_boot(conf, rel, disk)
        except (DaemonError, ValueError, OSError) as exc:  # ValueError: SlotError, GptError, UpdateConfigError
            with self.lock:
                self.st.last_error = str(exc)
                save_state(self.opts.state_dir, self.st)
            log.error("%s", exc)
            return 1
        if (self.st.staged_version and self.st.state != Status.UPDATED_NEED_REBOOT
                and self.st.staged_boot_id == self._boot_id()):
            # Killed between postinstall and saving the state: the GPT says whether the stage completed.
            staged = self._staged_slot(disk)
            if staged is not None and staged.priority > 0 and staged.tries > 0 and not staged.successful:
                self.set_state(Status.UPDATED_NEED_REBOOT, progress=1.0)
        if self.st.state == Status.UPDATED_NEED_REBOOT and self.st.staged_boot_id == self._boot_id():
            # Already staged in this boot: like update_engine, only ping, then see to the reboot.
            with contextlib.suppress(omaha.OmahaError):
                self._request(conf, rel, ping=True, updatecheck=False, events=[])
            self._reboot_step(conf, reboot)
            return 0
        return self._check_and_apply(conf, rel, disk, keys, interactive, reboot)

    def _check_and_apply(self, conf: config.UpdateConf, rel: dict[str, str], disk: Path, keys: list[PublicKey],
                         interactive: bool, reboot: Callable[[], None] | None) -> int:
        current = rel["VERSION"]
        st = self.st
        events: list[Event] = []
        rolled_back = st.previous_version is not None and st.previous_version != "" and \
            compare_versions(st.previous_version, current) == 0
        if rolled_back:
            events.append(Event(omaha.EVENT_UPDATE_COMPLETE, omaha.RESULT_ERROR, omaha.ERR_ROLLBACK))
        else:
            prev = "0.0.0.0" if st.previous_version is None else st.previous_version
            events.append(Event(omaha.EVENT_UPDATE_COMPLETE, omaha.RESULT_SUCCESS_REBOOT, previousversion=prev))
        self.set_state(Status.CHECKING_FOR_UPDATE)
        try:
            resp = self._request(conf, rel, ping=True, updatecheck=True, events=events, interactive=interactive)
        except omaha.OmahaError as exc:
            return self._fail(conf, rel, str(exc), exc.code)
        assert resp is not None
        self.poll_interval = resp.poll_interval
        self.set_state(Status.CHECKING_FOR_UPDATE, previous_version="", last_checked=time.time())
        upd = resp.update
        if upd is None:
            self.set_state(Status.IDLE, consecutive_failures=0, last_error=None, new_version="", progress=0.0)
            log.info("no update (running %s)", current)
            return 0
        if upd.version in st.failed_versions:
            log.warning("server offers %s, which rolled back on this host before: waiting for a newer one",
                        upd.version)
            self.set_state(Status.IDLE, consecutive_failures=0, new_version="",
                           last_error=f"{upd.version} rolled back here before; waiting for a newer release")
            return 0
        self.set_state(Status.UPDATE_AVAILABLE, new_version=upd.version, new_size=upd.size, progress=0.0)
        self._event(conf, rel, Event(omaha.EVENT_DOWNLOAD_STARTED, omaha.RESULT_SUCCESS))
        self.set_state(Status.DOWNLOADING)
        try:
            result = self._apply(conf, rel, disk, keys, upd)
        except applymod.Stopped as exc:
            with self.lock:
                self.st.last_error = str(exc)
                save_state(self.opts.state_dir, self.st)
            return 1
        except applymod.ApplyError as exc:
            return self._fail(conf, rel, str(exc), exc.code)
        self.set_state(Status.UPDATED_NEED_REBOOT, previous_version=current, staged_version=result.version,
                       staged_boot_id=self._boot_id(), staged_slot=result.slot, progress=1.0,
                       consecutive_failures=0, last_error=None)
        self._event(conf, rel, Event(omaha.EVENT_UPDATE_COMPLETE, omaha.RESULT_SUCCESS))
        self._reboot_step(conf, reboot)
        return 0

    def _apply(self, conf: config.UpdateConf, rel: dict[str, str], disk: Path, keys: list[PublicKey],
               upd: omaha.Update) -> applymod.Result:
        t = self.opts.transfer
        transfer = applymod.Transfer(**{**t.__dict__, "bandwidth": conf.bandwidth_bytes or t.bandwidth,
                                        "proxy": conf.proxy or t.proxy})
        policy = applymod.Policy(app_id=conf.app_id or rel.get("APPID"), arch=rel.get("ARCH") or _host_arch(),
                                 current_version=rel["VERSION"], expected_size=upd.size,
                                 expected_sha256=upd.sha256, expected_version=upd.version or None)
        downloaded = threading.Event()
        appliers: list[applymod.Applier] = []

        def on_phase(phase: str) -> None:
            if phase == "verifying" and not downloaded.is_set():
                downloaded.set()
                self._event(conf, rel, Event(omaha.EVENT_DOWNLOAD_FINISHED, omaha.RESULT_SUCCESS))
                self.set_state(Status.VERIFYING, progress=1.0)
            elif phase == "finalizing":
                # Recorded before postinstall touches the GPT, so a kill in between is recognised later.
                self.set_state(Status.FINALIZING, previous_version=rel["VERSION"], staged_version=upd.version,
                               staged_boot_id=self._boot_id(), staged_slot=appliers[-1].slot_name)

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase != "downloading":
                return
            with self.lock:
                self.st.progress = done / total if total else 0.0
                now = time.monotonic()
                if now - self._last_save >= 1.0:
                    self._last_save = now
                    save_state(self.opts.state_dir, self.st)

        last: applymod.ApplyError | None = None
        for url in upd.urls:  # update_engine moves on to the next URL when one fails
            appliers.append(applymod.Applier(url, disk, keys, policy=policy, transfer=transfer,
                                             state_dir=self.opts.state_dir, on_progress=on_progress,
                                             should_stop=self.should_stop, on_phase=on_phase))
            try:
                return appliers[-1].run()
            except applymod.TransferFailed as exc:
                last = exc
        assert last is not None
        raise last

    def _fail(self, conf: config.UpdateConf, rel: dict[str, str], message: str, code: int) -> int:
        log.error("update failed (code %s): %s", code, message)
        self.set_state(Status.REPORTING_ERROR_EVENT, last_error=message, last_error_code=code,
                       consecutive_failures=self.st.consecutive_failures + 1)
        self._event(conf, rel, Event(omaha.EVENT_UPDATE_COMPLETE, omaha.RESULT_ERROR, code))
        self.set_state(Status.IDLE, progress=0.0)
        return 1

    def _reboot_step(self, conf: config.UpdateConf, reboot: Callable[[], None] | None) -> None:
        try:
            coord = self._coordinator(conf)
        except Exception as exc:  # bad lock.conf: the update stays staged; say why
            with self.lock:
                self.st.last_error = f"cannot coordinate the reboot: {exc}"
                save_state(self.opts.state_dir, self.st)
            return
        coord.wait_and_reboot(reboot or _systemctl_reboot, self.should_stop)

    # ------------------------------------------------------------ long-running service

    def serve_forever(self, *, first_check: float | None = None) -> None:
        server = StatusServer(self.opts.socket_path, self)
        threading.Thread(target=server.serve_forever, daemon=True, name="status-socket").start()
        def stop(*_: object) -> None:
            self.stop_event.set()
            self.check_now.set()  # wake the scheduler's wait

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        sd_notify("READY=1")
        wait = fuzz(*FIRST_CHECK) if first_check is None else first_check
        try:
            while not self.stop_event.is_set():
                self.check_now.wait(timeout=wait)
                if self.stop_event.is_set():
                    break
                interactive = self.check_now.is_set()
                self.check_now.clear()
                try:
                    rc = self.run_once(interactive=interactive)
                except Exception as exc:  # a bug must not stop updates for good: log, back off, try again
                    log.exception("update run failed unexpectedly")
                    with self.lock:
                        self.st.last_error = f"internal error: {exc}"
                        self.st.consecutive_failures += 1
                        self.st.state = Status.IDLE
                        save_state(self.opts.state_dir, self.st)
                    rc = 1
                wait = next_interval(self.st.consecutive_failures if rc else 0, self.poll_interval)
                log.info("next check in %.0f s", wait)
        finally:
            sd_notify("STOPPING=1")
            server.shutdown()
            server.server_close()
            with contextlib.suppress(OSError):
                self.opts.socket_path.unlink()


def _host_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _systemctl_reboot() -> None:
    from obelisk.tools import run

    run(["systemctl", "reboot"])


# ---------------------------------------------------------------- status socket


class StatusServer(socketserver.ThreadingUnixStreamServer):
    """Unix socket, mode 0600 and peers checked by SO_PEERCRED: only root (or the daemon's own user) may talk."""

    daemon_threads = True

    def __init__(self, path: Path, daemon: Daemon) -> None:
        self.daemon_obj = daemon
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o177)
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            self.wfile.write(b'{"error": "permission denied: root only"}\n')
            return
        line = self.rfile.readline(4096)
        try:
            cmd = json.loads(line or b"{}").get("cmd", "status")
        except (ValueError, AttributeError):
            cmd = "?"
        d: Daemon = self.server.daemon_obj  # type: ignore[attr-defined]
        if cmd == "status":
            out = d.status()
        elif cmd == "check":
            d.check_now.set()
            out = {"ok": True, **d.status()}
        else:
            out = {"error": f"unknown command {cmd!r}"}
        self.wfile.write(json.dumps(out).encode() + b"\n")


def ask(socket_path: Path, cmd: str, timeout: float = 5.0) -> dict:
    """Client side of the status socket; OSError when no daemon listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data or b"{}")
