"""End to end: three "hosts" (temporary roots) get cloud-configs for a 3-member etcd cluster; the test
starts real etcd (Debian's etcd-server) from exactly the files obelisk wrote, and the cluster forms."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cloudconfig_helpers import make_root
from ports import free_ports
from typer.testing import CliRunner

from cloudconfig.cli import app
from obelisk.lock_conf import LockConfig
from obelisk.tools import ToolError, require, run

pytestmark = pytest.mark.etcd
runner = CliRunner()


def host_config(i: int, root: Path, peers: list[int], clients: list[int], token: str, discovery: str | None) -> str:
    cluster = ",".join(f"m{j}=http://127.0.0.1:{p}" for j, p in enumerate(peers))
    endpoints = ",".join(f"http://127.0.0.1:{c}" for c in clients)
    static = f"initial-cluster: {cluster}\n    initial-cluster-state: new"
    bootstrap = f"discovery: {discovery}" if discovery else static
    return f"""#cloud-config
hostname: control-{i}
coreos:
  etcd2:
    name: m{i}
    data-dir: {root}/var/lib/etcd/data
    initial-cluster-token: {token}
    {bootstrap}
    initial-advertise-peer-urls: http://$private_ipv4:{peers[i]}
    listen-peer-urls: http://$private_ipv4:{peers[i]}
    listen-client-urls: http://$private_ipv4:{clients[i]}
    advertise-client-urls: http://$private_ipv4:{clients[i]}
  update:
    group: stable
    reboot-strategy: etcd-lock
  locksmith:
    endpoint: {endpoints}
    group: control-plane
  units:
    - name: etcd2.service
      enable: true
      command: start
"""


def environment_file(root: Path) -> dict[str, str]:
    """Follow the drop-in obelisk wrote to its EnvironmentFile= and read it as systemd would."""
    dropins = sorted((root / "etc/systemd/system/etcd.service.d").glob("*.conf"))
    assert dropins, "no drop-in for etcd.service"
    env: dict[str, str] = {}
    for d in dropins:
        for m in re.finditer(r"^EnvironmentFile=-?(\S+)$", d.read_text(), re.M):
            for line in (root / m.group(1).lstrip("/")).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    env[key] = shlex.split(value)[0] if value else ""
    return env


@pytest.fixture
def etcd_procs() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()  # the data is thrown away: no need to wait for a graceful stop
    for p in procs:
        p.wait(timeout=30)


def _discovery_service(tmp_path: Path, procs: list[subprocess.Popen], size: int) -> str:
    """A real etcd with the v2 API as the discovery service (what discovery.etcd.io runs), size preset."""
    peer, client = free_ports(2)
    url = f"http://127.0.0.1:{client}"
    log = open(tmp_path / "discovery.log", "wb")  # noqa: SIM115 - lives as long as the process
    procs.append(subprocess.Popen(
        [require("etcd"), "--name=disc", f"--data-dir={tmp_path / 'disc'}", "--enable-v2=true",
         f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
         f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
         f"--initial-cluster=disc=http://127.0.0.1:{peer}"], stdout=log, stderr=subprocess.STDOUT))
    token = uuid.uuid4().hex
    deadline = time.monotonic() + 30
    while True:
        try:
            r = requests.put(f"{url}/v2/keys/discovery/{token}/_config/size", data={"value": str(size)}, timeout=2)
            if r.status_code in (200, 201):
                return f"{url}/v2/keys/discovery/{token}"
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, _logs(tmp_path)
        time.sleep(0.2)


@pytest.mark.timeout(150)  # the health wait below has its own 60 s deadline
@pytest.mark.parametrize("bootstrap", ["static", "discovery"])
def test_three_hosts_form_a_healthy_cluster(tmp_path: Path, etcd_procs: list[subprocess.Popen],
                                            bootstrap: str) -> None:
    require("etcdctl")  # ToolMissing names the package: a failure, not a skip (make setup installs it)
    ports = free_ports(6)
    peers, clients = ports[:3], ports[3:]
    token = f"obelisk-{uuid.uuid4().hex[:8]}"
    discovery = _discovery_service(tmp_path, etcd_procs, 3) if bootstrap == "discovery" else None
    roots = []
    for i in range(3):
        root = make_root(tmp_path / f"host{i}")
        cfg = tmp_path / f"host{i}.yaml"
        cfg.write_text(host_config(i, root, peers, clients, token, discovery))
        res = runner.invoke(app, ["apply", str(cfg), "--root", str(root)], env={"COREOS_PRIVATE_IPV4": "127.0.0.1"})
        assert res.exit_code == 0, res.output
        roots.append(root)
    etcd = require("etcd")
    for i, root in enumerate(roots):
        env = environment_file(root)
        assert env["ETCD_NAME"] == f"m{i}" and env["ETCD_INITIAL_CLUSTER_TOKEN"] == token
        assert ("ETCD_DISCOVERY" in env) == (discovery is not None)
        # only what obelisk wrote (plus PATH): no flags, no inherited ETCD_* variables
        clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        log = open(tmp_path / f"etcd{i}.log", "wb")  # noqa: SIM115 - lives as long as the process
        etcd_procs.append(subprocess.Popen([etcd], env=clean, stdout=log, stderr=subprocess.STDOUT, cwd=root))
    # the lock endpoints obelisk wrote into lock.conf are the ones the health check uses
    endpoints = ",".join(LockConfig.parse((roots[0] / "etc/obelisk/lock.conf").read_text()).endpoint)
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in etcd_procs), _logs(tmp_path)
        try:
            out = run(["etcdctl", f"--endpoints={endpoints}", "--dial-timeout=2s", "--command-timeout=3s",
                       "endpoint", "health"], env={"ETCDCTL_API": "3"}, timeout=20)
            if out.stdout.count("is healthy") + out.stderr.count("is healthy") == 3:
                break
            last = out.stdout + out.stderr
        except ToolError as exc:
            last = str(exc)
        time.sleep(0.5)
    else:
        pytest.fail(f"cluster not healthy within 60s: {last}\n{_logs(tmp_path)}")
    members = run(["etcdctl", f"--endpoints={endpoints}", "member", "list"], env={"ETCDCTL_API": "3"}, timeout=20)
    assert sorted(re.findall(r", (m\d), ", members.stdout)) == ["m0", "m1", "m2"]
    put = run(["etcdctl", f"--endpoints={endpoints}", "put", "obelisk/test", "quorum"], env={"ETCDCTL_API": "3"},
              timeout=20)
    assert put.stdout.strip() == "OK"
    for root in roots:  # and every host was told the same update group and lock group
        assert "GROUP=control-plane" in (root / "etc/obelisk/lock.conf").read_text()
        assert "REBOOT_STRATEGY=etcd-lock" in (root / "etc/obelisk/update.conf").read_text()
        link = root / "etc/systemd/system/multi-user.target.wants/etcd.service"
        assert os.readlink(link) == "/usr/lib/systemd/system/etcd.service"


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
