"""The ``host`` scenario: the default image as a container host, checked the way a user would.

The VM gets QEMU user networking with ``restrict=on`` (DHCP from QEMU, no route anywhere) and SSH and
etcd forwarded from 127.0.0.1; a NoCloud seed (FAT, label CIDATA) carries the cloud-config
(hostname, core's key, a single-member etcd, the lock endpoint, a unit); a second ext4 disk carries
a tiny container image (the VM has no registry). Then, with the real OpenSSH client: key login as
core, password login not offered; hostname, a DHCP address, resolved and timesyncd; ``podman load``
and ``podman run`` (output over SSH, a ``--restart=always`` container back after a reboot); etcd
healthy through the forwarded port and obelisk's lock commands against it; ``update status`` and
the boot marked good. A second VM from another copy of the same disk has its own SSH host key and
machine-id, and its cloud-config gives etcd settings etcd rejects: the host stays reachable and
says why, and the health rules (docs/host.md) decide the boot.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from builder.imagetest import oci_sample
from builder.imagetest.hostvm import GuestError, GuestVm
from obelisk.tools import require, run


class Context(Protocol):
    """What this scenario uses of ``scenarios.Context`` (that module registers this one: no import back)."""

    release: Path
    work: Path
    boot_timeout: float
    obelisk: list[str]
    log: Callable[[str], None]

    def fresh_disk(self, name: str, *, grow: int = 0, first_boot: bool = False) -> Path: ...


class ScenarioFailed(GuestError):
    """A check of the host scenario did not hold."""


def expect(cond: object, message: str) -> None:
    if not cond:
        raise ScenarioFailed(message)

IMAGES_LABEL = "OBELISK-IMGS"
UNIT_MARK = "OBELISK-HOST: unit from cloud-config ran"
GOOD = r"OBELISK-BOOT-GOOD|OBELISK-HEALTH-FAIL"


def cloud_config(hostname: str, pubkey: str, etcd_peer: str = "http://127.0.0.1:2380") -> str:
    return f"""#cloud-config
hostname: {hostname}
ssh_authorized_keys:
  - {pubkey}
coreos:
  etcd2:
    name: {hostname}
    listen-client-urls: http://0.0.0.0:2379
    advertise-client-urls: http://127.0.0.1:2379
    listen-peer-urls: {etcd_peer}
    initial-advertise-peer-urls: {etcd_peer}
    initial-cluster: {hostname}={etcd_peer}
    initial-cluster-state: new
  update:
    reboot_strategy: "off"
  locksmith:
    endpoint: http://127.0.0.1:2379
    group: lab
  units:
    - name: obelisk-hello.service
      command: start
      content: |
        [Unit]
        Description=a unit from cloud-config
        [Service]
        Type=oneshot
        ExecStart=/bin/sh -c 'echo "{UNIT_MARK}" > /dev/console'
"""


def nocloud_seed(dest: Path, user_data: str, instance: str) -> Path:
    """A FAT image labelled CIDATA with user-data and meta-data (cloud-init's NoCloud)."""
    src = dest.with_suffix(".d")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / "user-data").write_text(user_data)
    (src / "meta-data").write_text(f"instance-id: {instance}\nlocal-hostname: {instance}\n")
    dest.unlink(missing_ok=True)
    run(["truncate", "-s", "2M", dest])
    run([require("mkfs.fat"), "-n", "CIDATA", dest])
    run([require("mcopy"), "-i", dest, src / "user-data", src / "meta-data", "::"])
    return dest


# The manual-apply policy cases on the live host: (payload file, version, app id, arch) by case; None keeps
# the running value. Each is refused by default and accepted (as a dry run) with its override flag.
POLICY_CASES = {
    "older": ("0.0.1", None, None, "--allow-downgrade"),
    "same": (None, None, None, "--allow-downgrade"),
    "other-app": ("9999.0.0", "{00000000-0000-4000-8000-0000000000aa}", None, "--app-id"),
    "other-arch": ("9999.0.0", None, "arm64", "--arch"),
}


def policy_payloads(dest: Path, rel: dict) -> None:
    """Small signed payloads for POLICY_CASES (``policy-CASE.payload``) and the key they are signed
    with (``policy.pub``): the policy decides from the signed manifest, before any write."""
    from obelisk import signing
    from update_engine import payload

    signing.generate_keypair(dest / "policy-key", overwrite=True)
    shutil.copy(dest / "policy-key" / signing.PUBLIC_NAME, dest / "policy.pub")
    priv = signing.load_private_key(dest / "policy-key" / signing.PRIVATE_NAME)
    blob = dest / "policy-usr.img"
    blob.write_bytes(b"\0" * 65536)
    for case, (version, app_id, arch, _flag) in POLICY_CASES.items():
        payload.write_payload(blob, dest / f"policy-{case}.payload", app_id=app_id or rel["app_id"],
                              arch=arch or rel.get("arch", "amd64"), version=version or rel["version"],
                              verity_root_hash="0" * 64, hash_offset=65536, private_key=priv)
    shutil.rmtree(dest / "policy-key")
    blob.unlink()


def images_disk(dest: Path, rel: dict | None = None) -> Path:
    """An ext4 image labelled OBELISK-IMGS holding the sample container image as sample.tar (and the
    policy payloads of ``rel``'s release)."""
    src = dest.with_suffix(".d")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    oci_sample.write_archive(src / "sample.tar")
    if rel is not None:
        policy_payloads(src, rel)
    dest.unlink(missing_ok=True)
    run(["truncate", "-s", "16M", dest])
    run([require("mkfs.ext4"), "-q", "-F", "-L", IMAGES_LABEL, "-d", src, dest])
    return dest


def ssh_key(dest: Path) -> tuple[Path, str]:
    dest.unlink(missing_ok=True)
    dest.with_suffix(".pub").unlink(missing_ok=True)
    run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "obelisk-image-test",
         "-f", dest])
    return dest, dest.with_suffix(".pub").read_text().strip()


def offered_methods(vm: GuestVm) -> str:
    """The authentication methods sshd offers (asked with method "none", read from ssh's debug log)."""
    argv = vm.ssh_argv("core", "-o", "PreferredAuthentications=none", log_level="DEBUG1")
    res = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    m = re.search(r"Authentications that can continue: (\S+)", res.stderr)
    if not m:
        raise ScenarioFailed(f"sshd did not list its authentication methods: {res.stderr.strip()[-300:]}")
    return m.group(1)


@dataclass
class HostFacts:
    host_key: str = ""
    machine_id: str = ""
    times: dict[str, float] = field(default_factory=dict)


def _boot_good(vm: GuestVm, timeout: float, after: int = 0) -> tuple[int, str]:
    i, line = vm.wait_for(GOOD, timeout, after=after)
    if "HEALTH-FAIL" in line:
        failing = vm.ssh("systemctl list-units --state=failed --no-legend --plain", check=False).stdout.strip()
        raise ScenarioFailed(f"the boot was not healthy: {line.strip()[:200]}; failed units: {failing[:300]}")
    return i, line


def check_host(ctx: Context, work: Path, key: Path, pubkey: str, imgs: Path) -> HostFacts:
    facts = HostFacts()
    disk = ctx.fresh_disk("host/vm1", first_boot=True)
    seed = nocloud_seed(work / "vm1-seed.img", cloud_config("obelisk-host-1", pubkey), "obelisk-host-1")
    timeout = ctx.boot_timeout * 2  # first boot: ROOT grows, host keys are made, etcd starts
    with GuestVm(disk, work / "vm1.log", key, guest_ports=(22, 2379), extra_disks=[seed, imgs]) as vm:
        i, _ = _boot_good(vm, timeout)
        facts.times["first boot to marked good"] = vm.lines[i][0]
        facts.times["first boot to ssh"] = vm.wait_ssh(120)
        methods = offered_methods(vm)
        expect(methods == "publickey", f"sshd offers {methods}: only publickey was expected (no passwords)")
        expect(vm.ssh("hostname").stdout.strip() == "obelisk-host-1", "the hostname from cloud-config is not set")
        addr = vm.ssh("ip -4 -o addr show scope global dynamic").stdout
        expect(" inet " in addr, f"no DHCP address on any link: {addr.strip()[:200]}")
        active = vm.ssh("systemctl is-active systemd-resolved systemd-timesyncd systemd-networkd", check=False)
        expect(active.stdout.split() == ["active"] * 3, f"resolved/timesyncd/networkd: {active.stdout.split()}")
        vm.wait_for(re.escape(UNIT_MARK), 60)
        # containers
        vm.ssh(f"sudo mkdir -p /mnt/imgs && sudo mount -o ro /dev/disk/by-label/{IMAGES_LABEL} /mnt/imgs")
        vm.ssh("sudo podman load -q -i /mnt/imgs/sample.tar", timeout=300)
        out = vm.ssh(f"sudo podman run --rm --network none {oci_sample.REF} echo hello from a container",
                     timeout=300).stdout
        expect("hello from a container" in out, f"podman run printed {out!r}")
        net = vm.ssh(f"sudo podman run --rm {oci_sample.REF} ip -4 -o addr", timeout=300, check=False)
        expect(net.returncode == 0 and " inet " in net.stdout,
               f"a container on podman's default network has no address: {(net.stderr or net.stdout)[-300:]}")
        vm.ssh(f"sudo podman run -d --name keeper --restart=always {oci_sample.REF} "
               "sh -c 'while true; do echo alive; sleep 5; done'", timeout=300)
        # etcd and the lock
        etcd = f"http://127.0.0.1:{vm.ports[2379]}"
        health = run([require("etcdctl"), "--endpoints", etcd, "endpoint", "health"], check=False,
                     timeout=60, env={"ETCDCTL_API": "3"})
        expect(health.returncode == 0, f"etcd is not healthy: {(health.stderr or health.stdout).strip()[-300:]}")
        expect(vm.ssh("systemctl is-enabled etcd.service", check=False).stdout.strip() == "enabled",
               "cloud-config did not enable etcd.service")
        lock = run([*ctx.obelisk, "lock", "lock", "--endpoint", etcd, "--group", "lab", "--id", "from-the-test"],
                   check=False, timeout=60)
        expect(lock.returncode == 0, f"obelisk lock against the host's etcd: {(lock.stderr or lock.stdout)[-300:]}")
        status = json.loads(vm.ssh("sudo obelisk lock status --json").stdout)
        holders = json.dumps(status)
        expect("from-the-test" in holders, f"the guest's lock status does not show the holder: {holders[:300]}")
        run([*ctx.obelisk, "lock", "unlock", "--endpoint", etcd, "--group", "lab", "--id", "from-the-test"],
            timeout=60)
        # obelisk itself
        check_manual_apply(ctx, vm)
        upd = vm.ssh("sudo obelisk update status --json", check=False)
        expect(upd.returncode == 0, f"obelisk update status --json failed: {(upd.stderr or upd.stdout)[-300:]}")
        json.loads(upd.stdout)
        boot = json.loads(vm.ssh("sudo obelisk boot status --json").stdout)
        ctx.log(f"  host/vm1: boot status {json.dumps(boot)[:300]}")
        facts.machine_id = vm.ssh("cat /etc/machine-id").stdout.strip()
        facts.host_key = vm.host_key()
        # a reboot: the container comes back, identity stays
        mark = len(vm.lines)
        vm.ssh("sudo systemctl reboot", check=False, timeout=30)
        i, _ = _boot_good(vm, ctx.boot_timeout * 2, after=mark)
        facts.times["reboot to marked good"] = vm.lines[i][0] - vm.lines[mark][0] if mark < len(vm.lines) else 0.0
        vm.wait_ssh(120)
        names = vm.ssh("sudo podman ps --format '{{.Names}}'", timeout=120).stdout.split()
        expect("keeper" in names, f"the --restart=always container is not running after the reboot: {names}")
        expect(vm.ssh("cat /etc/machine-id").stdout.strip() == facts.machine_id, "the machine-id changed on reboot")
        expect(vm.host_key() == facts.host_key, "the SSH host key changed on reboot")
        vm.power_off()
    return facts


def check_manual_apply(ctx: Context, vm: GuestVm) -> None:
    """`obelisk update apply` on the live host refuses each policy case by default (one line, exit 2, the
    slots untouched) and accepts it with its override, said in a note (as a dry run: nothing written)."""
    before = vm.ssh("sudo obelisk boot status --json").stdout
    for case, (_v, app_id, arch, flag) in POLICY_CASES.items():
        cmd = f"sudo obelisk update apply /mnt/imgs/policy-{case}.payload --key /mnt/imgs/policy.pub"
        res = vm.ssh(cmd, check=False, timeout=120)
        lines = res.stderr.strip().splitlines()
        expect(res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "),
               f"update apply of the {case} payload was not refused in one line: rc {res.returncode} "
               f"{res.stderr.strip()[-300:]}")
        want = {"older": "(older)", "same": "(the same version)", "other-app": "wrong release",
                "other-arch": "wrong release"}[case]
        expect(want in lines[0], f"the refusal of the {case} payload does not say {want!r}: {lines[0][:300]}")
        value = {"--app-id": app_id, "--arch": arch}.get(flag)
        res = vm.ssh(f"{cmd} {flag}{' ' + shlex.quote(value) if value else ''} --dry-run", check=False, timeout=120)
        expect(res.returncode == 0 and "dry run" in res.stdout and "note: override" in res.stderr,
               f"update apply {flag} --dry-run of the {case} payload: rc {res.returncode} "
               f"{(res.stderr + res.stdout).strip()[-300:]}")
        ctx.log(f"  host/vm1: manual apply, {case}: refused ({lines[0][7:120]}...), accepted with {flag}")
    expect(vm.ssh("sudo obelisk boot status --json").stdout == before, "a refused or dry-run apply changed the slots")


def check_second_host(ctx: Context, work: Path, key: Path, pubkey: str, first: HostFacts) -> str:
    """Another copy of the same disk: its own identity; etcd settings etcd refuses (a peer address the host
    does not have) leave it reachable, with the reason in the journal and in `obelisk cloudconfig status`."""
    disk = ctx.fresh_disk("host/vm2", first_boot=True)
    bad = cloud_config("obelisk-host-2", pubkey, etcd_peer="http://192.0.2.1:2380")
    seed = nocloud_seed(work / "vm2-seed.img", bad, "obelisk-host-2")
    with GuestVm(disk, work / "vm2.log", key, extra_disks=[seed], mac="52:54:00:12:34:57") as vm:
        _, line = vm.wait_for(GOOD, ctx.boot_timeout * 2)
        vm.wait_ssh(120)
        expect(vm.host_key() != first.host_key, "two hosts from one image have the same SSH host key")
        mid = vm.ssh("cat /etc/machine-id").stdout.strip()
        expect(mid and mid != first.machine_id, f"two hosts from one image have the same machine-id {mid}")
        state = vm.ssh("systemctl is-failed etcd.service", check=False).stdout.strip()
        expect(state == "failed", f"etcd.service is {state!r} with a peer address the host does not have")
        journal = vm.ssh("sudo journalctl -u etcd.service --no-pager -o cat", check=False).stdout
        expect("192.0.2.1:2380" in journal, f"the journal does not say why etcd failed: {journal[-300:]}")
        report = vm.ssh("sudo obelisk cloudconfig status", check=False)
        text = report.stdout + report.stderr
        expect("etcd.service" in text and "192.0.2.1" in text,
               f"`obelisk cloudconfig status` does not name etcd's error: {text[-400:]}")
        ctx.log(f"  host/vm2: {text.strip()[:300]}")
        vm.power_off()
    healthy = "BOOT-GOOD" in line
    return "marked good" if healthy else "not marked good (etcd.service failed: the health check counts it)"


def scenario_host(ctx: Context) -> str:
    usr = ctx.release / "usr.img"
    listing = run(["unsquashfs", "-l", usr, "sbin/sshd", "bin/podman", "bin/etcd"], check=False).stdout
    missing = [t for t in ("sbin/sshd", "bin/podman", "bin/etcd") if t not in listing]
    if missing:
        raise ScenarioFailed(f"the image has no {', '.join(missing)}: the host scenario needs a host image "
                             "such as images/base.toml")
    work = ctx.work / "host"
    work.mkdir(parents=True, exist_ok=True)
    key, pubkey = ssh_key(work / "id_ed25519")
    imgs = images_disk(work / "images.img", json.loads((ctx.release / "release.json").read_text()))
    first = check_host(ctx, work, key, pubkey, imgs)
    verdict = check_second_host(ctx, work, key, pubkey, first)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in first.times.items())
    return f"ssh, podman, etcd, lock, reboot ok; {times}; second host: own keys and machine-id, bad etcd: {verdict}"
