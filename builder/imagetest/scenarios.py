"""The VM scenarios: boot, update, rollback, badverity, power-loss (one function each).

Each works on its own copy of the release's disk under ``RELEASE/test/<scenario>/`` and checks
both what the console showed and what the GPT says afterwards (through ``bootloader.slots``,
which first takes in what the boot loader recorded). ``update``, ``badverity`` and ``power-loss``
stage with ``obelisk update apply --disk``; ``rollback`` lets ``obelisk update daemon --once --disk``
stage over Omaha from ``obelisk update serve`` on loopback, so that its next run can report the
rollback (event 3/0, error code 44). The second release (version + 1) and the broken one (a
health hook that fails) are built with ``obelisk image build``.

On an image that ships ``obelisk-test-run`` (base), ``update`` also lets the guest stage the same
payload itself and ``power-loss`` also kills QEMU in the middle of that in-guest apply. The guest
has no network: the payload, the trusted key and a ``run.sh`` reach it on a second, read-only
virtio disk (ext4 labelled OBELISK-TEST), whose appearance starts ``obelisk-test.service`` through
a udev rule; markers (``OBELISK-TEST: ...``) on the serial console say how far it got.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bootloader import gpt, slots
from builder.build import data_dir
from builder.imagetest import hostvm, qemu
from obelisk import signing
from obelisk.errors import ObeliskError
from obelisk.inputs import check_input
from obelisk.tools import run

PLACEHOLDER_GUID = uuid.UUID("00000000-0000-0000-0000-000000000001")
GROW_BYTES = 256 << 20  # the boot scenario enlarges the disk by this much before the first boot


class ScenarioFailed(ObeliskError, AssertionError):
    """A scenario's check did not hold; the message says which and what the guest showed."""


@dataclass
class Outcome:
    name: str
    ok: bool
    message: str
    boots: list[qemu.Boot] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        times = " ".join(f"{b.slot or '?'}{'*' if b.trial else ''}={b.seconds:.1f}s" for b in self.boots)
        return f"{'PASS' if self.ok else 'FAIL'} {self.name:<11} {self.seconds:6.1f}s  boots: {times or '-'}  " \
               f"{self.message}"


@dataclass
class Context:
    release: Path
    work: Path
    boot_timeout: float
    next_release: Callable[[], Path]
    broken_release: Callable[[], Path]
    obelisk: list[str]
    log: Callable[[str], None] = print
    boots: list[qemu.Boot] = field(default_factory=list)
    signing_key: Path | None = None  # private key the image trusts (signs the guest's run.sh); default: dev key
    hosts: int = 3  # VMs of the fleet scenario

    def release_meta(self, rel: Path | None = None) -> dict:
        return json.loads(((rel or self.release) / "release.json").read_text())

    booted: Path | None = None  # a disk that did its first boot (set by the boot scenario)

    def fresh_disk(self, name: str, *, grow: int = 0, first_boot: bool = False) -> Path:
        """A copy of the release's disk; by default of one that has already done its first boot, as a
        host being updated has (saves the first-boot work in every scenario; the boot scenario checks it)."""
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        disk = d / "disk.raw"
        src = self.release / "disk.raw" if first_boot or self.booted is None else self.booted
        run(["cp", "--sparse=always", src, disk])
        if grow:
            run(["qemu-img", "resize", "-q", "-f", "raw", disk, f"+{grow}"])
        return disk

    def power_on(self, disk: Path, tag: str, **kw) -> qemu.Run:
        log = disk.parent / f"{tag}.log"
        kw.setdefault("stop_when", lambda b, line: qemu.GOOD in line)
        kw.setdefault("boot_timeout", self.boot_timeout)
        r = qemu.power_on(disk, log, **kw)
        self.boots.extend(r.boots)
        self.log(f"  {disk.parent.name}/{tag}: {r.summary()} (log {log})")
        return r

    def stage(self, disk: Path, release: Path) -> None:
        """`obelisk update apply RELEASE/update.payload --disk DISK` with the key the image trusts."""
        key = trusted_key(self.release, disk.parent)
        res = run([*self.obelisk, "update", "apply", release / "update.payload", "--disk", disk, "--key", key],
                  check=False, timeout=600)
        if res.returncode != 0:
            raise ScenarioFailed(f"obelisk update apply failed: {(res.stderr or res.stdout).strip()[-300:]}")
        self.log(f"  {disk.parent.name}: {res.stdout.strip()}")

    def status(self, disk: Path) -> dict:
        res = run([*self.obelisk, "boot", "status", "--disk", disk, "--json"], check=False, timeout=60)
        if res.returncode != 0:
            raise ScenarioFailed(f"obelisk boot status failed: {(res.stderr or res.stdout).strip()[-300:]}")
        return json.loads(res.stdout)


def trusted_key(release: Path, scratch: Path) -> Path:
    """The public key the release's image trusts (read out of its usr.img, as a host would have it)."""
    meta = json.loads((release / "release.json").read_text())
    kid = meta.get("signing_key_id")
    out = scratch / "trusted.pub"
    if kid:
        res = run(["unsquashfs", "-cat", release / "usr.img", f"share/obelisk/keys/{kid}.pub"], check=False)
        if res.returncode == 0 and "PUBLIC KEY" in res.stdout:
            out.write_text(res.stdout)
            return out
    dev = data_dir() / "dev-key" / "obelisk.pub"
    if dev.exists():
        return dev
    raise ScenarioFailed(f"cannot find the public key {kid} that {release} trusts")


# Scenarios that stage a release built (and signed) here or hand the guest a script signed here: they need
# the private key of one of the keys the release under test trusts.
SIGNED = ("update", "rollback", "badverity", "power-loss", "fleet")


def signing_key_problem(release: Path, meta: dict, key: Path | None) -> str | None:
    """Why the scenarios' signing key would be refused by the release's image, or None.

    Checked before anything boots: otherwise every scenario fails late with "signature was not
    made by any trusted key".
    """
    trusted = meta.get("trusted_key_ids") or ([meta["signing_key_id"]] if meta.get("signing_key_id") else [])
    if not isinstance(trusted, list) or not trusted:
        return None  # a release.json without key ids: nothing to compare with
    ids = ", ".join(map(str, trusted))
    tried = key if key is not None else data_dir() / "dev-key" / signing.PRIVATE_NAME
    which = "--key" if key is not None else "the development key (no --key given)"
    if key is None and not tried.exists():
        return (f"{release} trusts key {ids}; {which} does not exist at {tried}: pass --key with the private key "
                f"of {ids}")
    kid = signing.public_key_of(signing.load_private_key(check_input(tried, "private key"))).key_id
    if kid in trusted:
        return None
    return (f"{release} trusts only key {ids} (signed by {meta.get('signing_key_id', '?')}), but {which} {tried} is "
            f"key {kid}: the image would refuse what the scenarios sign with it; pass --key with the private key of "
            f"{ids}")


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise ScenarioFailed(message)


def slot_state(disk: Path) -> dict[str, slots.Slot]:
    return {s.name: s for s in slots.read_slots(disk)}


def describe(disk: Path) -> str:
    return " ".join(f"{s.name}:P{s.priority}T{s.tries}S{int(s.successful)}" for s in slots.read_slots(disk))


# --- in-guest commands (images that ship obelisk-test-run, i.e. base) -------------------------------

TEST_LABEL = "OBELISK-TEST"
APPLY_TIMEOUT = 900.0  # extra seconds for a boot that also stages 100+ MB under TCG
GUEST_RUNNER = "lib/obelisk/obelisk-test-run"  # inside usr.img; pulled in by 90-obelisk-test.rules
APPLY_RUNNING = re.compile(r"OBELISK-TEST: apply running wchar=(\d+)")
APPLY_EXIT = re.compile(r"OBELISK-TEST: apply exit (\d+)")
# The guest's own staging: `obelisk update apply` from the test disk, its bytes written reported every
# second (from /proc/PID/io) so the power-loss scenario can pull the plug in the middle of the write.
GUEST_APPLY = """#!/bin/sh
echo "OBELISK-TEST: applying $(cat version) from $PWD/update.payload"
obelisk update apply ./update.payload --key ./trusted.pub > /run/obelisk/apply.out 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
    echo "OBELISK-TEST: apply running wchar=$(sed -n 's/^wchar: //p' /proc/$pid/io 2>/dev/null || echo 0)"
    sleep 1
done
wait "$pid"
rc=$?
tail -n 2 /run/obelisk/apply.out | sed 's/^/OBELISK-TEST: apply says: /'
sync
echo "OBELISK-TEST: apply exit $rc"
"""


def guest_can_run(release: Path) -> bool:
    """Whether the release's image runs a script from a disk labelled OBELISK-TEST (base does, tiny not)."""
    res = run(["unsquashfs", "-l", release / "usr.img", GUEST_RUNNER], check=False)
    return res.returncode == 0 and GUEST_RUNNER in res.stdout


def make_test_disk(dest: Path, script: str, files: dict[str, Path], texts: dict[str, str] | None = None, *,
                   signing_key: Path | None = None) -> Path:
    """A small ext4 image labelled OBELISK-TEST holding ``run.sh`` (signed: the guest runs it only when a key it
    trusts signed it) and ``files`` (attached read-only)."""
    tree = dest.with_suffix(".d")
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    (tree / "run.sh").write_text(script)
    key = signing.load_private_key(signing_key or data_dir() / "dev-key" / signing.PRIVATE_NAME)
    (tree / "run.sh.sig").write_bytes(signing.sign(key, script.encode()))
    for name, text in (texts or {}).items():
        (tree / name).write_text(text)
    for name, src in files.items():
        try:
            (tree / name).hardlink_to(src)  # no copy of a 150 MB payload just to pack it
        except OSError:
            shutil.copyfile(src, tree / name)
    need = sum(f.stat().st_size for f in tree.iterdir())
    size_mib = need * 11 // 10 // (1 << 20) + 16
    dest.unlink(missing_ok=True)
    run(["mkfs.ext4", "-q", "-F", "-L", TEST_LABEL, "-E", "root_owner=0:0", "-d", tree, dest, f"{size_mib}M"])
    shutil.rmtree(tree, ignore_errors=True)
    return dest


def apply_disk(ctx: Context, scratch: Path, release: Path) -> Path:
    """The test disk for the guest's own `obelisk update apply`: payload, the trusted key, run.sh."""
    files = {"update.payload": release / "update.payload", "trusted.pub": trusted_key(ctx.release, scratch)}
    return make_test_disk(scratch / "apply-test.img", GUEST_APPLY, files,
                          {"version": ctx.release_meta(release)["version"] + "\n"}, signing_key=ctx.signing_key)


def slot_magic(disk: Path, index: int) -> bytes:
    off, _length = slots.slot_extent(disk, index)
    with open(disk, "rb") as f:
        f.seek(off)
        return f.read(4)


# --- scenarios --------------------------------------------------------------------------------------


def scenario_boot(ctx: Context) -> str:
    disk = ctx.fresh_disk("boot", grow=GROW_BYTES, first_boot=True)
    version = ctx.release_meta()["version"]
    r = ctx.power_on(disk, "boot1")
    expect(len(r.boots) == 1 and r.boots[0].good, f"first boot did not come up healthy: {r.summary()}")
    b = r.boots[0]
    expect(b.slot == "A", f"first boot ran slot {b.slot}, expected A")
    expect(b.os_version == version, f"console showed version {b.os_version!r}, release is {version}")
    expect(b.usr_mount is not None, "the guest did not report its /usr mount")
    dev, fstype, opts = b.usr_mount
    expect(dev in ("/dev/mapper/usr", "/dev/dm-0") and fstype == "squashfs" and opts.split(",")[0] == "ro",
           f"/usr is {dev} {fstype} {opts}, expected the verity device /dev/mapper/usr, squashfs, ro")
    table = gpt.read_table(disk)
    expect(table.disk_guid != PLACEHOLDER_GUID, "first boot kept the placeholder disk GUID")
    root = table.partition(9)
    expect(root is not None and root.last_lba >= table.last_usable_lba - 2048,
           f"ROOT ends at LBA {root.last_lba if root else '?'}, the disk's last usable LBA is {table.last_usable_lba}")
    a = slot_state(disk)["A"]
    expect(a.successful and a.priority > 0, f"slot A after boot: {describe(disk)}")
    ctx.booted = disk.parent / "booted.raw"
    run(["cp", "--sparse=always", disk, ctx.booted])
    return f"version {version} on A, /usr {dev} ro, ROOT grown to LBA {root.last_lba}; {describe(disk)}"


def scenario_update(ctx: Context) -> str:
    disk = ctx.fresh_disk("update")
    new = ctx.next_release()
    version = ctx.release_meta(new)["version"]
    ctx.stage(disk, new)
    st = slot_state(disk)
    expect(st["B"].tries > 0 and not st["B"].successful, f"after apply: {describe(disk)}")
    r = ctx.power_on(disk, "trial")
    expect(len(r.boots) == 1, f"trial boot: {r.summary()}")
    b = r.boots[0]
    expect(b.slot == "B" and b.trial and b.good, f"trial boot: {r.summary()}")
    expect(b.os_version == version, f"trial boot showed version {b.os_version!r}, staged {version}")
    r2 = ctx.power_on(disk, "after")
    expect(len(r2.boots) == 1 and r2.boots[0].slot == "B" and not r2.boots[0].trial and r2.boots[0].good,
           f"boot after the trial: {r2.summary()}")
    status = ctx.status(disk)
    st = slot_state(disk)
    expect(st["B"].successful and st["B"].priority > st["A"].priority,
           f"status after update: {describe(disk)} ({json.dumps(status)[:200]})")
    host = f"{version} on B, marked good, prioritized; {describe(disk)}"
    if not guest_can_run(ctx.release):
        return host
    return f"host-staged: {host}; guest-staged: {update_in_guest(ctx, new, version)}"


def update_in_guest(ctx: Context, new: Path, version: str) -> str:
    """The same update, staged by the guest itself from the payload on a second (read-only) virtio disk."""
    disk = ctx.fresh_disk("update-guest")
    extra = apply_disk(ctx, disk.parent, new)
    r = ctx.power_on(disk, "apply", extra_disks=[extra], boot_timeout=ctx.boot_timeout + APPLY_TIMEOUT,
                     stop_when=lambda b, line: bool(APPLY_EXIT.search(line)))
    expect(r.end == "stopped" and r.boots[0].slot == "A" and not r.boots[0].trial,
           f"in-guest apply run: {r.summary()} (see {r.log})")
    rc = APPLY_EXIT.search(r.log.read_text())
    expect(rc is not None and rc.group(1) == "0", f"the guest's obelisk update apply failed (see {r.log})")
    st = slot_state(disk)
    expect(st["B"].tries > 0 and not st["B"].successful, f"after the in-guest apply: {describe(disk)}")
    r = ctx.power_on(disk, "trial")
    b = r.boots[0]
    expect(len(r.boots) == 1 and b.slot == "B" and b.trial and b.good, f"trial boot: {r.summary()}")
    expect(b.os_version == version, f"trial boot showed version {b.os_version!r}, the guest staged {version}")
    r2 = ctx.power_on(disk, "after")
    expect(len(r2.boots) == 1 and r2.boots[0].slot == "B" and not r2.boots[0].trial and r2.boots[0].good,
           f"boot after the trial: {r2.summary()}")
    ctx.status(disk)
    st = slot_state(disk)
    expect(st["B"].successful and st["B"].priority > st["A"].priority, f"status after update: {describe(disk)}")
    return f"{version} on B, marked good, prioritized; {describe(disk)}"


class UpdateService:
    """`obelisk update serve` on loopback plus the host side of `obelisk update daemon --once --disk`.

    The daemon runs on the test host against the VM's disk image (the guest has no network): it
    stages over Omaha like a host would and, after the VM ran, reports what the boot did.
    """

    def __init__(self, ctx: Context, releases: Path, disk: Path) -> None:
        self.ctx, self.disk = ctx, disk
        self.dir = disk.parent / "daemon"
        self.dir.mkdir(exist_ok=True)
        self.events = self.dir / "events.jsonl"
        port = _free_port()
        self.proc = subprocess.Popen(
            [*ctx.obelisk, "update", "serve", str(releases), "--listen", f"127.0.0.1:{port}", "--no-state", "--events",
             str(self.events)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._wait_ready(port)
        rel = run(["unsquashfs", "-cat", ctx.release / "usr.img", "share/obelisk/release"]).stdout
        (self.dir / "release").write_text(rel)
        (self.dir / "update.conf").write_text(
            f"SERVER=http://127.0.0.1:{port}/v1/update/\nGROUP=stable\nREBOOT_STRATEGY=off\n")
        keys = self.dir / "keys"
        keys.mkdir(exist_ok=True)
        shutil.copy(trusted_key(ctx.release, self.dir), keys / "trusted.pub")
        (self.dir / "health.d").mkdir(exist_ok=True)
        (self.dir / "machine-id").write_text(uuid.uuid4().hex + "\n")

    def _wait_ready(self, port: int) -> None:
        import socket
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ScenarioFailed(f"obelisk update serve exited: {self.proc.stdout.read()[-300:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise ScenarioFailed("obelisk update serve did not listen within 30s")

    def once(self) -> str:
        """One daemon run; every run is a new boot (new boot id)."""
        (self.dir / "boot_id").write_text(str(uuid.uuid4()) + "\n")
        res = run([*self.ctx.obelisk, "update", "daemon", "--once", "--disk", self.disk,
                   "--state-dir", self.dir / "state", "--conf", self.dir / "update.conf",
                   "--usr-conf", self.dir / "none.conf", "--release", self.dir / "release",
                   "--keys-dir", self.dir / "keys", "--lock-conf", self.dir / "none.conf",
                   "--health-dir", self.dir / "health.d", "--socket", self.dir / "status.sock",
                   "--boot-id-file", self.dir / "boot_id", "--machine-id-file", self.dir / "machine-id"],
                  check=False, timeout=600)
        if res.returncode != 0:
            raise ScenarioFailed(f"obelisk update daemon --once failed: {(res.stderr or res.stdout).strip()[-300:]}")
        self.ctx.log(f"  {self.disk.parent.name}: daemon --once: {res.stdout.strip()}")
        return res.stdout.strip()

    def reported(self) -> list[dict]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        hostvm.stop_process(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario_rollback(ctx: Context) -> str:
    disk = ctx.fresh_disk("rollback")
    broken = ctx.broken_release()
    svc = UpdateService(ctx, broken.parent.parent, disk)
    try:
        # Staged by the update daemon itself (Omaha over loopback), so it can report the rollback later.
        svc.once()
        st = slot_state(disk)
        expect(st["B"].tries > 0 and not st["B"].successful, f"daemon did not stage the broken release: "
                                                             f"{describe(disk)}")
        r = ctx.power_on(disk, "trial", max_boots=3)
        expect(len(r.boots) >= 2, f"the broken trial boot did not reset the VM: {r.summary()}")
        first, last = r.boots[0], r.boots[-1]
        expect(first.slot == "B" and first.trial and not first.good, f"trial boot: {r.summary()}")
        expect(last.slot == "A" and last.good, f"after the failed trial: {r.summary()}")
        st = slot_state(disk)
        expect(st["B"].tries == 0 and not st["B"].successful, f"broken slot after rollback: {describe(disk)}")
        expect(slots.next_index(list(st.values())) == slots.USR_A, f"next boot would not pick A: {describe(disk)}")
        r2 = ctx.power_on(disk, "again")
        expect(len(r2.boots) == 1 and r2.boots[0].slot == "A" and r2.boots[0].good,
               f"the broken slot was chosen again: {r2.summary()}")
        ctx.status(disk)
        svc.once()
        events = svc.reported()
        rollback = [e for e in events if (int(e.get("eventtype", -1)), int(e.get("eventresult", -1)),
                                          int(e.get("errorcode") or 0)) == (3, 0, 44)]
        expect(bool(rollback), f"the daemon did not report the rollback (3/0 code 44); events: {events[-4:]}")
        expect(slot_state(disk)["B"].tries == 0, f"the daemon staged the broken release again: {describe(disk)}")
    finally:
        svc.close()
    return f"trial of B failed its health check, VM reset, A came back; daemon reported 3/0 code 44; " \
           f"{describe(disk)}"


def squashfs_id_table(disk: Path, index: int) -> int:
    """Byte offset on the disk of slot ``index``'s squashfs id index table (read at mount)."""
    off, _length = slots.slot_extent(disk, index)
    with open(disk, "rb") as f:
        f.seek(off)
        sb = f.read(96)
    magic, = struct.unpack_from("<I", sb, 0)
    expect(magic == 0x73717368, f"slot {index} holds no squashfs (magic {magic:#x})")
    id_table_start, = struct.unpack_from("<Q", sb, 48)
    return off + id_table_start


def corrupt_slot(disk: Path, index: int) -> int:
    """Flip the bytes of the squashfs id index (inside one 4 KiB data block of the slot).

    GRUB does not read that table, so the kernel and initramfs still load; Linux reads it when
    it mounts /usr, through dm-verity, which must stop the boot there.
    """
    where = squashfs_id_table(disk, index)
    with open(disk, "r+b") as f:
        f.seek(where)
        data = f.read(8)
        f.seek(where)
        f.write(bytes(b ^ 0xFF for b in data))
    return where


def scenario_badverity(ctx: Context) -> str:
    disk = ctx.fresh_disk("badverity")
    ctx.stage(disk, ctx.next_release())
    where = corrupt_slot(disk, slots.USR_B)
    r = ctx.power_on(disk, "trial", max_boots=3)
    expect(len(r.boots) >= 2, f"the corrupted trial boot did not reset the VM: {r.summary()}")
    first, last = r.boots[0], r.boots[-1]
    expect(first.slot == "B" and first.trial and not first.good, f"trial boot: {r.summary()}")
    expect(first.verity_failed, f"the trial boot did not stop at dm-verity (see {r.log})")
    expect(last.slot == "A" and last.good, f"after the verity failure: {r.summary()}")
    st = slot_state(disk)
    expect(st["B"].tries == 0 and not st["B"].successful, f"corrupted slot afterwards: {describe(disk)}")
    return f"flipped 8 bytes at disk byte {where}; verity stopped B, A came back; {describe(disk)}"


def scenario_power_loss(ctx: Context) -> str:
    disk = ctx.fresh_disk("power-loss")
    ctx.stage(disk, ctx.next_release())
    # SIGKILL QEMU once the trial's initramfs runs: after GRUB burned the try, before mark-good.
    r = ctx.power_on(disk, "killed", kill_on=lambda b, line: b.slot == "B" and "obelisk-initramfs: slot" in line)
    expect(r.end == "killed" and r.boots[0].slot == "B", f"power-loss run: {r.summary()}")
    for i in (1, 2):
        ri = ctx.power_on(disk, f"after{i}", max_boots=3)
        last = ri.boots[-1]
        st = slot_state(disk)
        expect(last.good and st[last.slot].successful, f"boot {i} after the power loss: {ri.summary()}; "
                                                       f"{describe(disk)}")
    trial = f"killed during B's trial; the following boots came up on good slots; {describe(disk)}"
    if not guest_can_run(ctx.release):
        return trial
    return f"{trial}; {power_loss_in_guest(ctx)}"


KILL_AFTER_BYTES = 24 << 20  # into the slot: well inside a payload of 100+ MB, so the slot is half-written


def power_loss_in_guest(ctx: Context) -> str:
    """SIGKILL QEMU while the guest's own `obelisk update apply` writes the passive slot."""
    disk = ctx.fresh_disk("power-loss-guest")
    new = ctx.next_release()
    extra = apply_disk(ctx, disk.parent, new)
    before = slot_magic(disk, slots.USR_B)
    written = [0]

    def kill_mid_write(b: qemu.Boot, line: str) -> bool:
        m = APPLY_RUNNING.search(line)
        if m:
            written[0] = int(m.group(1))
        return written[0] >= KILL_AFTER_BYTES

    r = ctx.power_on(disk, "killed-apply", extra_disks=[extra], kill_on=kill_mid_write,
                     boot_timeout=ctx.boot_timeout + APPLY_TIMEOUT,
                     stop_when=lambda b, line: bool(APPLY_EXIT.search(line)))
    expect(r.end == "killed", f"the in-guest apply was not killed mid-write (it ended first?): {r.summary()} "
                              f"(see {r.log})")
    st = slot_state(disk)
    expect(not st["B"].successful and (st["B"].priority == 0 or st["B"].tries == 0),
           f"the half-written slot B is bootable: {describe(disk)}")
    expect(slots.next_index(list(st.values())) == slots.USR_A, f"next boot would not pick A: {describe(disk)}")
    after = slot_magic(disk, slots.USR_B)
    for i in (1, 2):
        ri = ctx.power_on(disk, f"after-apply{i}", max_boots=3)
        st = slot_state(disk)
        expect(all(b.slot == "A" for b in ri.boots), f"boot {i} after the killed apply chose the half-written "
                                                      f"slot: {ri.summary()}")
        expect(ri.boots[-1].good and st["A"].successful, f"boot {i} after the killed apply: {ri.summary()}; "
                                                          f"{describe(disk)}")
    changed = "changed" if after != before else "unchanged at its first block"
    return (f"in-guest apply killed after {written[0] >> 20} MiB written (slot B {changed}); "
            f"both following boots ran A; {describe(disk)}")


def scenario_host(ctx: Context) -> str:
    """SSH, containers, etcd and identity on the default image (builder/imagetest/host.py)."""
    from builder.imagetest import host  # it builds on this module

    return host.scenario_host(ctx)


def scenario_fleet(ctx: Context) -> str:
    """N hosts, their own etcd, a roll under the lock and a broken release stopped (builder/imagetest/fleet.py)."""
    from builder.imagetest import fleet  # it builds on this module

    return fleet.scenario_fleet(ctx)


def scenario_ignition(ctx: Context) -> str:
    """An Ignition config on a config drive: applied on the first boot, not again; a broken one stops the boot
    (builder/imagetest/ignition.py)."""
    from builder.imagetest import ignition  # it builds on this module

    return ignition.scenario_ignition(ctx)


# Scenarios that need the default image's host parts (sshd, podman, etcd): tests/vm/test_host.py runs them.
HOST_IMAGE_ONLY = ("host", "ignition", "fleet")
# Run only when asked for by name (`-s fleet`): several VMs for most of an hour under TCG.
ON_REQUEST = ("fleet",)

SCENARIOS: dict[str, Callable[[Context], str]] = {
    "boot": scenario_boot,
    "update": scenario_update,
    "rollback": scenario_rollback,
    "badverity": scenario_badverity,
    "power-loss": scenario_power_loss,
    "host": scenario_host,
    "ignition": scenario_ignition,
    "fleet": scenario_fleet,
}


def run_scenario(ctx: Context, name: str) -> Outcome:
    import time

    ctx.boots = []
    t0 = time.monotonic()
    try:
        msg = SCENARIOS[name](ctx)
        ok = True
    except (ScenarioFailed, qemu.VmError, hostvm.GuestError) as exc:
        ok, msg = False, str(exc)
    except Exception as exc:  # a tool or builder error: report it as this scenario's failure
        ok, msg = False, f"{type(exc).__name__}: {exc}"
    return Outcome(name, ok, msg, list(ctx.boots), time.monotonic() - t0)


def obelisk_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("obelisk")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from obelisk.cli import main; main()"]


def bump_version(version: str, by: int = 1) -> str:
    m = re.match(r"^(.*?)(\d+)([^\d]*)$", version)
    if not m:
        raise ValueError(f"version {version!r} has no number to increase")
    return f"{m.group(1)}{int(m.group(2)) + by}"


def build_release(definition: Path, out: Path, version: str, key: Path | None, log: Callable[[str], None],
                  cache: Path | None = None) -> Path:
    argv = [*obelisk_cmd(), "image", "build", definition, "--out", out, "--version", version, "--format", "raw"]
    if key is not None:
        argv += ["--key", key]
    if cache is not None:
        argv += ["--cache", cache]
    log(f"  building {definition.name} {version} into {out}")
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise ScenarioFailed(f"obelisk image build {definition} --version {version} failed: "
                             f"{(res.stderr or res.stdout).strip()[-400:]}")
    dirs = [p.parent for p in out.glob(f"*/{version}/release.json")]
    if not dirs:
        raise ScenarioFailed(f"obelisk image build wrote no release under {out}")
    return dirs[0]


BROKEN_HOOK = """#!/bin/sh
# A deliberately broken release for the rollback scenario: its health check always fails.
echo "broken release: health check fails on purpose"
exit 1
"""


def broken_definition(definition: Path, work: Path) -> Path:
    """A copy of ``definition`` with one more overlay: a health hook that always fails."""
    import tomllib

    text = definition.read_text()
    data = tomllib.loads(text)
    overlay = work / "broken-overlay"
    hook = overlay / "usr/lib/obelisk/health.d/50-broken"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(BROKEN_HOOK)
    hook.chmod(0o755)
    files = [str((definition.parent / p).resolve()) for p in data.get("files", [])] + [str(overlay)]
    keys = [str((definition.parent / p).resolve()) for p in data.get("trusted_keys", [])]
    body = re.sub(r"(?m)^(files|trusted_keys)\s*=.*$", "", text)
    head = f"files = {json.dumps(files)}\n" + (f"trusted_keys = {json.dumps(keys)}\n" if keys else "")
    out = work / definition.name
    out.write_text(head + body)
    return out
