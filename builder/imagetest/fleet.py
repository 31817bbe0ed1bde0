"""The ``fleet`` scenario: N hosts from one release form their own etcd, roll an update one at a time under
the etcd lock, and stop a broken release by themselves.

The run owns a private network (``netns.PrivateNet``: a namespace with a bridge and one tap per VM, no
link or route out); the update server (with fleet state in SQLite, safe mode and halt on failure) and
every client of the test run inside it. Each VM boots a copy of the release's disk with its own NoCloud
seed: hostname, core's key, a static address, a member of an N-member etcd cluster (static
``initial-cluster``), ``coreos.update`` pointing at the server and ``reboot_strategy: etcd-lock`` in a
locksmith group whose semaphore allows one reboot at a time.

Roll 1 publishes the next release (same definition and key): every host stages it, waits for the lock,
reboots into it, is marked good and gives the lock back. Roll 2 publishes a broken one (its health
hook fails): the first host to take it falls back by itself and reports code 44; the server halts the
group (safe mode) and no other host downloads it. With 3 or more hosts, roll 1 also cuts the power of
the first host seen holding the lock (QEMU killed during the shutdown of its reboot, before GRUB starts
the trial): the others keep etcd's quorum and wait, the lock stays with the dead host, and when its power
comes back it boots the trial, rejoins etcd, is marked good and gives the lock back. A thread samples
the semaphore every second (the timeline and the reboot check); etcd's own history of the key is read
afterwards: no revision ever had more holders than slots. Everything is written to
``<release>/test/fleet/``: console logs, the raw events (``fleet.json``) and ``timeline.svg``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bootloader import layout
from builder.imagetest import timeline
from builder.imagetest.host import GOOD, ScenarioFailed, expect, nocloud_seed, ssh_key
from builder.imagetest.hostvm import GuestError, GuestVm, stop_process
from builder.imagetest.netns import PrivateNet
from obelisk.tools import require
from update_engine.reboot import keys
from update_engine.reboot.identity import app_specific_id

GROUP = "stable"        # Omaha track
LOCK_GROUP = "fleet"    # locksmith group
PORT = 8080
POLL = 15               # PollInterval the server tells hosts (s)
POWER_OFF = 30          # seconds the power-cut host stays off
BOOTING = "OBELISK-GRUB: booting slot"
ETCD_ENV = {"ETCDCTL_API": "3", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


class Context(Protocol):
    release: Path
    work: Path
    boot_timeout: float
    obelisk: list[str]
    log: Callable[[str], None]
    hosts: int

    def fresh_disk(self, name: str, *, grow: int = 0, first_boot: bool = False) -> Path: ...
    def next_release(self) -> Path: ...
    def broken_release(self) -> Path: ...
    def release_meta(self, rel: Path | None = None) -> dict: ...


def mac_of(n: int) -> str:
    return f"52:54:00:77:00:{n:02x}"


def cloud_config(n: int, hosts: int, net: PrivateNet, pubkey: str) -> str:
    """Host ``n``'s cloud-config (its address comes from the network's DHCP, fixed by its MAC)."""
    addr = net.address(n)
    cluster = ",".join(f"fleet-{i}=http://{net.address(i)}:2380" for i in range(1, hosts + 1))
    return f"""#cloud-config
hostname: fleet-{n}
ssh_authorized_keys:
  - {pubkey}
coreos:
  etcd2:
    name: fleet-{n}
    listen-client-urls: http://0.0.0.0:2379
    advertise-client-urls: http://{addr}:2379
    listen-peer-urls: http://{addr}:2380
    initial-advertise-peer-urls: http://{addr}:2380
    initial-cluster: {cluster}
    initial-cluster-state: new
  update:
    server: http://{net.host_address}:{PORT}/v1/update/
    group: {GROUP}
    reboot_strategy: etcd-lock
  locksmith:
    endpoint: http://127.0.0.1:2379
    group: {LOCK_GROUP}
"""


@dataclass
class Host:
    n: int
    vm: GuestVm
    machine_id: str = ""
    holder: str = ""    # its id in the semaphore: app-specific, derived from the machine id (reboot/identity.py)
    wall0: float = 0.0  # wall time of the VM's t0 (its console times are relative to it)
    past: list[tuple[float, str]] = field(default_factory=list)  # (wall time, line) of earlier power-ons
    power_off: list[tuple[float, float]] = field(default_factory=list)  # (off, on) wall times of a power cut

    @property
    def name(self) -> str:
        return f"fleet-{self.n}"

    def wall(self, t: float) -> float:
        return self.wall0 + t

    def boots(self) -> list[tuple[float, str]]:
        """(wall time, line) of every GRUB boot line on the console."""
        return self.marks(BOOTING)

    def marks(self, text: str) -> list[tuple[float, str]]:
        now = [(self.wall(t), ln) for t, ln in list(self.vm.lines)]
        return [(t, ln) for t, ln in self.past + now if text in ln]

    def cut_power(self) -> float:
        """QEMU killed: the power cord pulled. Its console so far is kept (in wall time)."""
        self.vm.kill()
        off = time.time()
        self.past += [(self.wall(t), ln) for t, ln in list(self.vm.lines)]
        self.vm.lines.clear()
        return off

    def power_on(self, off: float) -> None:
        """Power back on from the same disk; the console of this power-on goes to its own log."""
        self.vm.log = self.vm.log.with_name(f"vm{self.n}-power{len(self.power_off) + 2}.log")
        self.vm.start()
        self.wall0 = time.time() - self.vm.seconds()
        self.power_off.append((off, time.time()))


@dataclass
class LockMonitor:
    """Samples the semaphore's holders every second (wall time, holders) while the run goes on."""

    net: PrivateNet
    endpoints: str
    samples: list[tuple[float, list[str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="lock-monitor")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            holders = read_holders(self.net, self.endpoints)
            if holders is not None:
                self.samples.append((time.time(), holders))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def holders_at(self, t: float) -> list[str] | None:
        before = [h for (ts, h) in self.samples if ts <= t]
        return before[-1] if before else None


@dataclass
class PowerCut:
    """Roll 1's fault: the first host seen holding the reboot lock loses power (QEMU killed) while it shuts
    down for its reboot, stays off POWER_OFF seconds and comes back. Meanwhile the others' etcd must keep
    quorum and the lock must stay with the dead host (nobody else reboots)."""

    hosts: list[Host]
    monitor: LockMonitor
    net: PrivateNet
    log: Callable[[str], None]
    victim: Host | None = None
    boots_before: int = 0
    quorum: list[str] = field(default_factory=list)   # what the others' etcd said while the victim was off
    held_while_off: list[list[str]] = field(default_factory=list)
    error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="power-cut")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=POWER_OFF + 120)

    def _run(self) -> None:
        try:
            seen = len(self.monitor.samples)
            while not self._stop.wait(0.2):
                samples = self.monitor.samples[seen:]
                seen += len(samples)
                holder = next((h for _, held in samples for h in self.hosts if h.holder in held), None)
                if holder is not None:
                    self._cut(holder)
                    return
        except Exception as exc:  # reported by the roll's check, never lost in a thread
            self.error = f"{type(exc).__name__}: {exc}"

    def _cut(self, h: Host) -> None:
        self.victim, self.boots_before = h, len(h.boots())
        off = h.cut_power()
        self.log(f"    {time.strftime('%H:%M:%S')} power cut: {h.name} (holding the lock) is off for {POWER_OFF}s")
        others = ",".join(f"http://{x.vm.address}:2379" for x in self.hosts if x is not h)
        while time.time() - off < POWER_OFF:
            res = etcdctl(self.net, others, "endpoint", "health")
            self.quorum.append("ok" if res.returncode == 0 else (res.stderr or res.stdout).strip()[-200:])
            held = read_holders(self.net, others)
            if held is not None:
                self.held_while_off.append(held)
            time.sleep(5)
        h.power_on(off)
        self.log(f"    {time.strftime('%H:%M:%S')} power back: {h.name}")

    def verdict(self, endpoints: str) -> str:
        """After the roll: what the fault proved, or ScenarioFailed."""
        expect(not self.error, f"the power cut failed: {self.error}")
        h = self.victim
        expect(h is not None, "no host was seen holding the lock during roll 1: the power cut never happened")
        assert h is not None
        expect(bool(self.quorum) and all(q == "ok" for q in self.quorum),
               f"the other hosts' etcd lost quorum while {h.name} was off: {self.quorum[-3:]}")
        expect(all(held == [h.holder] for held in self.held_while_off),
               f"the lock did not stay with {h.name} while it was off: {self.held_while_off[:3]}")
        res = etcdctl(self.net, f"http://{h.vm.address}:2379", "endpoint", "health")
        expect(res.returncode == 0, f"{h.name}'s etcd member did not come back: {(res.stderr or res.stdout)[-200:]}")
        members = etcdctl(self.net, endpoints, "member", "list").stdout.strip().splitlines()
        expect(len(members) == len(self.hosts) and all(", started," in m for m in members),
               f"etcd's members after the power cut: {members}")
        boots = h.boots()
        return (f"power cut: {h.name} lost power holding the lock ({len(self.quorum)} health checks of the "
                f"other {len(self.hosts) - 1} all ok, the lock stayed with it), came back, booted the trial "
                f"({len(boots) - self.boots_before} boot(s) since), rejoined etcd ({len(members)} started), "
                f"finished")


def etcdctl(net: PrivateNet, endpoints: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(net.argv([require("etcdctl"), "--endpoints", endpoints, "--command-timeout=10s", *args]),
                          capture_output=True, text=True, timeout=timeout, env=ETCD_ENV)


def read_holders(net: PrivateNet, endpoints: str) -> list[str] | None:
    try:
        res = etcdctl(net, endpoints, "get", keys.sem_key(LOCK_GROUP), "--print-value-only", timeout=20)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        return None
    text = res.stdout.strip()
    if not text:
        return []
    try:
        return list(json.loads(text).get("holders") or [])
    except (ValueError, AttributeError):
        return None


def semaphore_history(net: PrivateNet, endpoints: str) -> list[dict]:
    """Every revision of the semaphore key, from etcd's own history: [{"rev", "slots", "holders"}]."""
    proc = subprocess.Popen(net.argv([require("etcdctl"), "--endpoints", endpoints, "watch", "--rev=1",
                                      keys.sem_key(LOCK_GROUP), "-w", "json"]),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=ETCD_ENV)
    try:
        out, _ = proc.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    import base64

    history = []
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        for ev in msg.get("Events") or []:
            kv = ev.get("kv") or {}
            value = base64.b64decode(kv.get("value", "") or "").decode(errors="replace")
            try:
                obj = json.loads(value) if value else {}
            except ValueError:
                obj = {}
            history.append({"rev": int(kv.get("mod_revision", 0)), "slots": obj.get("total_slots"),
                            "holders": list(obj.get("holders") or [])})
    return history


class FleetServer:
    """`obelisk update serve` inside the private network with fleet state, an admin token and a short
    PollInterval; releases are published by linking them into its folder."""

    def __init__(self, ctx: Context, net: PrivateNet, work: Path) -> None:
        self.ctx, self.net, self.work = ctx, net, work
        self.releases = work / "releases"
        self.state = work / "server-state"
        self.token = work / "admin.token"
        self.token.write_text("fleet-admin-" + str(time.time_ns()) + "\n")
        self.token.chmod(0o600)
        self.url = f"http://{net.host_address}:{PORT}"
        self.log = open(work / "server.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = net.start([*ctx.obelisk, "update", "serve", self.releases, "--listen",
                               f"{net.host_address}:{PORT}", "--state-dir", self.state, "--admin-token-file",
                               self.token, "--poll-interval", str(POLL), "--events", work / "events.jsonl",
                               "--lock-endpoint", "etcd:" + ",".join(f"http://{net.address(i)}:2379"
                                                                     for i in range(1, ctx.hosts + 1))],
                              stdout=self.log, stderr=subprocess.STDOUT)

    def publish(self, release: Path) -> str:
        meta = json.loads((release / "release.json").read_text())
        dest = self.releases / meta["name"] / meta["version"]
        dest.mkdir(parents=True, exist_ok=True)
        payload = dest / "update.payload"
        if not payload.exists():
            try:
                payload.hardlink_to(release / "update.payload")
            except OSError:
                shutil.copy(release / "update.payload", payload)
        tmp = dest / ".release.json.tmp"
        shutil.copy(release / "release.json", tmp)
        tmp.rename(dest / "release.json")  # last: the catalog sees a release only when it is whole
        return meta["version"]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ScenarioFailed(f"obelisk update serve exited: {(self.work / 'server.log').read_text()[-400:]}")
            res = subprocess.run(self.net.argv([require("curl"), "-sf", "-m", "5", f"{self.url}/health"]),
                                 capture_output=True, text=True, timeout=30)
            if res.returncode == 0:
                return
            time.sleep(0.5)
        raise ScenarioFailed(f"obelisk update serve did not answer {self.url}/health within {timeout:.0f}s")

    def fleet(self, *args: str) -> object:
        """`obelisk fleet ARGS --json` against this server, parsed."""
        res = subprocess.run(self.net.argv([*self.ctx.obelisk, "fleet", *args, "--server", self.url,
                                            "--token-file", str(self.token), "--json"]),
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise ScenarioFailed(f"obelisk fleet {' '.join(args)}: {(res.stderr or res.stdout).strip()[-300:]}")
        return json.loads(res.stdout)

    def console(self, path: str, save: str) -> str:
        """A console page as an admin sees it (bearer token), kept as ``save`` in the run's folder."""
        token = self.token.read_text().strip()
        res = subprocess.run(self.net.argv([require("curl"), "-sf", "-m", "30", "-H", f"Authorization: Bearer {token}",
                                            f"{self.url}/console/{path.lstrip('/')}"]),
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise ScenarioFailed(f"console page /console/{path} failed: curl exit {res.returncode}")
        (self.work / save).write_text(res.stdout)
        return res.stdout

    def instances(self) -> dict[str, dict]:
        """machine id -> its row, read from the server's SQLite file (read-only)."""
        db = self.state / "fleet.sqlite"
        if not db.exists():
            return {}
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            con.row_factory = sqlite3.Row
            return {r["machine_id"]: dict(r) for r in con.execute("SELECT * FROM instances")}
        except sqlite3.Error:
            return {}
        finally:
            con.close()

    def events(self) -> list[dict]:
        path = self.work / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]

    def close(self) -> None:
        stop_process(self.proc)
        self.log.close()


@dataclass
class Phase:
    name: str
    ok: bool
    seconds: float
    detail: str


class Run:
    def __init__(self, ctx: Context, net: PrivateNet, work: Path) -> None:
        self.ctx, self.net, self.work = ctx, net, work
        self.phases: list[Phase] = []
        self.t0 = time.time()

    def phase(self, name: str, fn: Callable[[], str]) -> None:
        t = time.monotonic()
        try:
            detail = fn()
        except (ScenarioFailed, GuestError) as exc:
            self.phases.append(Phase(name, False, time.monotonic() - t, str(exc)))
            self.ctx.log(f"  FAIL {name:<18} {time.monotonic() - t:6.0f}s  {exc}")
            raise
        self.phases.append(Phase(name, True, time.monotonic() - t, detail))
        self.ctx.log(f"  PASS {name:<18} {time.monotonic() - t:6.0f}s  {detail}")


def _wait(what: str, timeout: float, check: Callable[[], bool], every: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise ScenarioFailed(f"{what} within {timeout:.0f}s")


class Interrupted(ScenarioFailed):
    """A signal ended the run; the private network, the VMs and the server are still taken down."""


@contextlib.contextmanager
def _signals_end_the_run() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT raise inside the run, so its `finally` takes the network and VMs down
    (a process started in the background has SIGINT ignored: it is turned back on here)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise Interrupted(f"the fleet run was interrupted by signal {signal.Signals(signum).name}")

    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    old = {s: signal.signal(s, stop) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def scenario_fleet(ctx: Context) -> str:
    with _signals_end_the_run():
        return _fleet(ctx)


def _fleet(ctx: Context) -> str:
    n_hosts = max(1, int(getattr(ctx, "hosts", 3)))
    work = ctx.work / "fleet"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key, pubkey = ssh_key(work / "id_ed25519")
    base = ctx.release_meta()
    record: dict = {"hosts": n_hosts, "base": base["version"], "phases": [], "lock_samples": [], "hosts_info": {}}
    with PrivateNet() as net:
        run = Run(ctx, net, work)
        server = FleetServer(ctx, net, work)
        hosts: list[Host] = []
        endpoints = ",".join(f"http://{net.address(i)}:2379" for i in range(1, n_hosts + 1))
        monitor = LockMonitor(net, endpoints)
        try:
            server.publish(ctx.release)
            server.wait_ready()
            server.fleet("rollout", "set", GROUP, "--safe-mode", "--halt-share", "0.2", "--halt-window", "5",
                         "--retry-after", "1d")
            net.dhcp({mac_of(n): net.address(n) for n in range(1, n_hosts + 1)}, work)
            for n in range(1, n_hosts + 1):
                mac = mac_of(n)
                tap = net.tap(n)
                disk = ctx.fresh_disk(f"fleet/vm{n}", first_boot=True)
                seed = nocloud_seed(work / f"vm{n}-seed.img", cloud_config(n, n_hosts, net, pubkey), f"fleet-{n}")
                vm = GuestVm(disk, work / f"vm{n}.log", key, guest_ports=(22, 2379), extra_disks=[seed], mac=mac,
                             memory_mib=1024, net=["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                                                   "-device", f"virtio-net-pci,netdev=n0,mac={mac}"],
                             wrap=net.argv([]), address=net.address(n))
                hosts.append(Host(n, vm))
            built: list[Path] = []
            # Both releases first: a build beside booting VMs would slow both down (2 cores under TCG).
            run.phase("build", lambda: _build(ctx, built))
            nxt, broken = built
            run.phase("boot", lambda: _boot_all(ctx, hosts, net))
            run.phase("etcd", lambda: _etcd_healthy(net, endpoints, n_hosts))
            monitor.start()
            cut = PowerCut(hosts, monitor, net, ctx.log) if n_hosts >= 3 else None
            run.phase("roll-1", lambda: _roll(ctx, server, hosts, nxt, base["version"], cut, endpoints))
            run.phase("roll-2", lambda: _roll_broken(ctx, server, hosts, broken, ctx.release_meta(nxt)["version"]))
            run.phase("lock-safety", lambda: _lock_safety(net, endpoints, hosts, monitor))
        finally:
            monitor.stop()
            record["phases"] = [vars(p) for p in run.phases]
            record["lock_samples"] = [{"time": t, "holders": h} for t, h in monitor.samples]
            record["events"] = server.events()
            record["instances"] = server.instances()
            record["hosts_info"] = {
                h.name: {"machine_id": h.machine_id, "holder": h.holder, "boots": h.boots(), "log": str(h.vm.log),
                         "good": [t for t, _ in h.marks("OBELISK-BOOT-GOOD")],
                         "failed": [t for t, _ in h.marks("OBELISK-HEALTH-FAIL")],
                         "power_off": h.power_off} for h in hosts}
            record["t0"] = run.t0
            for h in hosts:
                h.vm.kill()
            server.close()
            record["figures"] = timeline.figures(record)
            for what, row in record["figures"].items():
                ctx.log(f"  {what}: " + ", ".join(f"{k} {v:.0f}s" for k, v in row.items()))
            record["rolls"] = timeline.roll_figures(record)
            for what, row in record["rolls"].items():
                ctx.log(f"  {what}: " + ", ".join(f"{k} {v:.2f}" if k == "ratio" else f"{k} {v:.0f}s"
                                                  for k, v in row.items()))
            (work / "fleet.json").write_text(json.dumps(record, indent=1, default=str))
            try:
                timeline.write_svg(work / "timeline.svg", record)
            except Exception as exc:  # the picture must never hide the run's own result
                ctx.log(f"  timeline.svg not written: {exc}")
    per = ", ".join(f"{p.name} {p.seconds:.0f}s" for p in run.phases)
    return f"{n_hosts} host(s): {per}; timeline {work / 'timeline.svg'}"


def _build(ctx: Context, out: list[Path]) -> str:
    out += [ctx.next_release(), ctx.broken_release()]
    versions = [ctx.release_meta(r)["version"] for r in out]
    expect(versions[0] != versions[1], f"the next and the broken release have one version {versions[0]}")
    return f"next {versions[0]}, broken {versions[1]} (same definition and key)"


def _boot_all(ctx: Context, hosts: list[Host], net: PrivateNet) -> str:
    for h in hosts:
        h.vm.start()
        h.wall0 = time.time() - h.vm.seconds()
    times = []
    for h in hosts:
        i, line = h.vm.wait_for(GOOD, ctx.boot_timeout * 3)
        times.append(h.vm.lines[i][0])
        h.vm.wait_ssh(300)
        h.machine_id = h.vm.ssh("cat /etc/machine-id").stdout.strip()
        h.holder = app_specific_id(h.machine_id)
        if "HEALTH-FAIL" in line:
            failed = h.vm.ssh("systemctl list-units --state=failed --no-legend --plain", check=False).stdout
            raise ScenarioFailed(f"{h.name}: first boot not healthy: {line.strip()[:160]}; failed: {failed[:300]}")
    return "first boot to marked good " + ", ".join(f"{h.name} {t:.0f}s" for h, t in zip(hosts, times, strict=True))


def _etcd_healthy(net: PrivateNet, endpoints: str, n_hosts: int) -> str:
    last = ""

    def healthy() -> bool:
        nonlocal last
        res = etcdctl(net, endpoints, "endpoint", "health")
        members = etcdctl(net, endpoints, "member", "list")
        last = (res.stderr or res.stdout).strip()[-300:]
        return res.returncode == 0 and len(members.stdout.strip().splitlines()) == n_hosts

    _wait(f"the hosts' etcd cluster of {n_hosts} was not healthy (last: {last})", 300, healthy)
    return f"{n_hosts} member(s) healthy at {endpoints}"


def _nudge(hosts: list[Host], log: Callable[[str], None]) -> None:
    """`obelisk update check` on every host (the daemon's first own check is minutes after boot). Not
    fatal: a host that does not answer in time checks by itself (PollInterval) a little later."""
    for h in hosts:
        for attempt in (1, 2):
            try:
                if h.vm.ssh("sudo obelisk update check", check=False, timeout=180).returncode == 0:
                    break
            except GuestError as exc:
                log(f"    {h.name}: update check not requested ({exc}); attempt {attempt}")
            time.sleep(5)


def _by_host(server: FleetServer, hosts: list[Host]) -> dict[str, dict]:
    rows = server.instances()
    return {h.name: rows.get(h.machine_id, {}) for h in hosts}


def _roll(ctx: Context, server: FleetServer, hosts: list[Host], release: Path, old: str,
          cut: PowerCut | None = None, endpoints: str = "") -> str:
    version = server.publish(release)
    ctx.log(f"  published {version}")
    if cut is not None:
        cut.start()
    try:
        _nudge(hosts, ctx.log)
        _wait_all_on(ctx, server, hosts, version)
    finally:
        if cut is not None:
            cut.stop()
    for h in hosts:
        _expect_on(h, version)
    fault = "; " + cut.verdict(endpoints) if cut is not None else ""
    return f"every host on {version}, marked good, {old} kept as fallback{fault}"


def _wait_all_on(ctx: Context, server: FleetServer, hosts: list[Host], version: str) -> None:
    seen: dict[str, str] = {}

    def done() -> bool:
        rows = _by_host(server, hosts)
        for name, r in rows.items():
            state = f"{r.get('version')}/{r.get('status')}"
            if seen.get(name) != state:
                seen[name] = state
                ctx.log(f"    {time.strftime('%H:%M:%S')} {name}: {state}")
        return all(r.get("version") == version and r.get("status") == "complete" for r in rows.values())

    _wait(f"not every host reached {version} (last: {seen})", 1500 * len(hosts), done, every=3)


def host_state(h: Host) -> tuple[str, str, dict[str, dict]]:
    """(running version, running slot, slots by name) as the host itself says."""
    rel = h.vm.ssh("cat /usr/share/obelisk/release").stdout
    version = next((ln.split("=", 1)[1].strip().strip('"') for ln in rel.splitlines() if ln.startswith("VERSION=")), "")
    m = re.search(r"obelisk\.slot=(\w)", h.vm.ssh("cat /proc/cmdline").stdout)
    st = json.loads(h.vm.ssh("sudo obelisk boot status --json").stdout)
    return version, m.group(1) if m else "?", {layout.name_of(s["index"]): s for s in st.get("slots", [])}


def _expect_on(h: Host, version: str, *, fallback: bool = True) -> None:
    """The host runs ``version`` from a slot marked good, and (``fallback``) the other slot is kept good."""
    running, slot, by_name = host_state(h)
    expect(running == version, f"{h.name} runs {running!r}, not {version}")
    other = next((s for n, s in by_name.items() if n != slot), None)
    mine = by_name.get(slot, {})
    expect(bool(mine.get("successful")), f"{h.name}: running slot {slot} is not marked good: {by_name}")
    expect(not fallback or other is not None and other.get("successful") and other.get("priority", 0) > 0,
           f"{h.name}: the other slot is not kept as a good fallback: {by_name}")


def _roll_broken(ctx: Context, server: FleetServer, hosts: list[Host], broken: Path, good: str) -> str:
    published = time.time()
    version = server.publish(broken)
    ctx.log(f"  published {version} (broken: its health hook fails)")
    _nudge(hosts, ctx.log)
    victim: list[Host] = []

    def fell_back() -> bool:
        rows = _by_host(server, hosts)
        bad = [h for h in hosts if rows[h.name].get("status") == "rolled_back"]
        if bad:
            victim[:] = bad
        return bool(bad)

    _wait(f"no host reported a rollback from {version}", 1500, fell_back, every=3)
    first = victim[0]
    _wait("the group did not halt", 120, lambda: _halted(server)[0])
    halted, reason = _halted(server)
    expect(first.machine_id in reason or first.name in reason,
           f"the halt reason does not name the host that failed ({first.machine_id}): {reason}")
    # The others check again: they stay where they are.
    _nudge([h for h in hosts if h is not first], ctx.log)
    time.sleep(POLL + 10)
    others = [h for h in hosts if h is not first]
    other_ids = {h.machine_id for h in others}
    took = [e for e in server.events() if e.get("eventtype") == 13 and e.get("machineid") in other_ids
            and e.get("time", 0) >= published]
    rows = _by_host(server, hosts)
    expect(all(rows[h.name].get("version") == good for h in hosts),
           f"after the broken release not every host runs {good}: "
           f"{ {n: r.get('version') for n, r in rows.items()} }")
    expect(not took and all(rows[h.name].get("status") != "rolled_back" for h in others),
           f"other hosts took the broken release: {took[:3]}")
    sent = str(rows[first.name].get("reason") or "")
    expect("50-broken" in sent, f"{first.name}: the server has no reason naming the failed hook: {sent!r}")
    for h in hosts:
        _expect_on(h, good, fallback=h is not first)
    st = json.loads(first.vm.ssh("sudo obelisk update status --json").stdout)
    expect(version in json.dumps(st.get("failed_versions", st)),
           f"{first.name}: the failed trial of {version} is not recorded: {json.dumps(st)[:300]}")
    status = server.fleet("status")
    expect(GROUP in json.dumps(status.get("halted") if isinstance(status, dict) else None),
           f"obelisk fleet status does not list {GROUP} as halted: {json.dumps(status)[:300]}")
    page = server.console(f"groups/{GROUP}", "console-group.html")
    expect("halted" in page.lower() and first.machine_id in page,
           f"the console's page of {GROUP} does not show the halt naming {first.machine_id}")
    return (f"{first.name} fell back from {version} and reported 44 ({sent[:120]}); "
            f"group halted: {reason[:160]}")


def _halted(server: FleetServer) -> tuple[bool, str]:
    out = server.fleet("groups")
    groups = out.get("groups", out) if isinstance(out, dict) else out
    for g in groups if isinstance(groups, list) else []:
        if g.get("name") == GROUP:
            state = g.get("state") or g.get("rollout") or g
            return bool(state.get("halted")), str(state.get("halt_reason") or "")
    return False, ""


def _lock_safety(net: PrivateNet, endpoints: str, hosts: list[Host], monitor: LockMonitor) -> str:
    history = semaphore_history(net, endpoints)
    expect(bool(history), "etcd has no history of the semaphore key (was the lock ever taken?)")
    over = [h for h in history if h["slots"] is not None and len(h["holders"]) > h["slots"]]
    expect(not over, f"the semaphore was over-subscribed at revisions {[h['rev'] for h in over][:5]}")
    expect(history[-1]["holders"] == [], f"holders left at the end: {history[-1]['holders']}")
    ids = {h.holder for h in hosts}
    unheld = []
    for h in hosts:
        for t, line in h.boots()[1:]:  # every boot after the first one is a reboot of the run
            held = monitor.holders_at(t - 1)
            if held is not None and h.holder not in held:
                unheld.append(f"{h.name} at {time.strftime('%H:%M:%S', time.localtime(t))}: {line.strip()[:80]}")
    expect(not unheld, f"hosts rebooted without holding the lock: {unheld[:3]}")
    takers = {x for rev in history for x in rev["holders"]}
    expect(takers <= ids, f"unknown holders in the semaphore's history: {sorted(takers - ids)}")
    return (f"{len(history)} revisions of the semaphore, never more holders than slots; every reboot held the "
            f"lock; free at the end")
