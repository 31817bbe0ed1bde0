"""Parts of the fleet scenario that run without VMs: the private network (a real network namespace with a
bridge and taps: private, and gone afterwards), the cloud-config each host gets (checked by obelisk's own
validator), etcd's history of a semaphore read back from a real etcd, and the timeline picture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from builder.imagetest import fleet, timeline
from builder.imagetest.netns import PrivateNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (etcdlib)
from etcdlib import LocalEtcd  # noqa: E402


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.timeout(60)
def test_private_net_has_no_way_out_and_is_gone_after() -> None:
    with PrivateNet() as net:
        name = net.name
        assert name in _namespaces()
        net.tap(1)
        net.check_private()
        routes = subprocess.run(net.argv(["ip", "-4", "route", "show"]), capture_output=True, text=True).stdout
        assert routes.strip().startswith("10.77.0.0/24") and len(routes.strip().splitlines()) == 1
        out = subprocess.run(net.argv(["ip", "route", "get", "1.1.1.1"]), capture_output=True, text=True)
        assert out.returncode != 0 and "unreachable" in out.stderr.lower()
        sleeper = net.start(["sleep", "600"])
    assert sleeper.poll() is not None, "a process started in the network outlived it"
    assert name not in _namespaces()


@pytest.mark.timeout(60)
def test_private_net_is_removed_when_the_run_fails() -> None:
    with pytest.raises(RuntimeError), PrivateNet() as net:
        name = net.name
        raise RuntimeError("the scenario failed")
    assert name not in _namespaces()


def test_each_host_gets_a_cloud_config_obelisk_accepts(tmp_path: Path) -> None:
    net = PrivateNet()
    for n in (1, 2, 3):
        cfg = tmp_path / f"host{n}.yml"
        key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample test"
        cfg.write_text(fleet.cloud_config(n, 3, net, key))
        res = subprocess.run([str(Path(sys.executable).with_name("obelisk")), "cloudconfig", "validate", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr + res.stdout
        text = cfg.read_text()
        assert "initial-cluster: fleet-1=http://10.77.0.11:2380,fleet-2=http://10.77.0.12:2380,fleet-3=" in text
        assert "reboot_strategy: etcd-lock" in text and f"advertise-client-urls: http://10.77.0.1{n}:2379" in text


@pytest.mark.etcd
@pytest.mark.timeout(120)
def test_semaphore_history_is_read_from_etcd_itself(tmp_path: Path) -> None:
    from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore

    class Loopback(PrivateNet):  # the history reader's command line, run here on loopback
        def argv(self, argv):  # noqa: ANN001, ANN202
            return [str(a) for a in argv]

    with LocalEtcd(tmp_path) as etcd:
        sem = EtcdSemaphore(EtcdEndpoints(etcd.endpoints), fleet.LOCK_GROUP)
        sem.set_max(1)
        sem.lock("host-a")
        sem.unlock("host-a")
        sem.lock("host-b")
        sem.unlock("host-b")
        hist = fleet.semaphore_history(Loopback(), etcd.endpoints)
        assert [h["holders"] for h in hist][-4:] == [["host-a"], [], ["host-b"], []]
        assert all(h["slots"] == 1 for h in hist)
        assert fleet.read_holders(Loopback(), etcd.endpoints) == []


def test_timeline_draws_every_host_and_phase(tmp_path: Path) -> None:
    t0 = time.time()
    rec = {"t0": t0, "base": "0.1.0",
           "hosts_info": {"fleet-1": {"machine_id": "m1", "holder": "h1",
                                      "boots": [[t0 + 5, "OBELISK-GRUB: booting slot A"],
                                                [t0 + 200, "OBELISK-GRUB: booting slot B"]],
                                      "good": [t0 + 60, t0 + 260], "failed": []},
                          "fleet-<2>": {"machine_id": "m2", "boots": [], "good": [], "failed": [t0 + 300]}},
           "events": [{"time": t0 + 100, "machineid": "m1", "eventtype": 13, "eventresult": 1},
                      {"time": t0 + 150, "machineid": "m1", "eventtype": 3, "eventresult": 1},
                      {"time": t0 + 320, "machineid": "m2", "eventtype": 3, "eventresult": 0, "errorcode": 44}],
           "lock_samples": [{"time": t0 + 150, "holders": []}, {"time": t0 + 190, "holders": ["h1"]},
                            {"time": t0 + 280, "holders": []}]}
    bars = timeline.segments(rec)
    assert [k for k, _, _ in bars["fleet-1"]] == ["staging", "waiting for the lock", "holding the lock"]
    fig = timeline.figures(rec)
    assert fig == {"fleet-1 update 1": {"staging": 50, "waiting for the lock": 40, "lock to marked good": 70,
                                        "lock held": 90}}
    svg = timeline.write_svg(tmp_path / "t.svg", rec).read_text()
    ET.fromstring(svg)  # well-formed
    assert "fleet-&lt;2&gt;" in svg and "rollback reported" in svg and "health check failed" in svg
    json.dumps(rec)


def test_timeline_shows_a_power_cut_and_the_roll_against_its_ideal(tmp_path: Path) -> None:
    t0 = time.time()
    info = {"machine_id": "m1", "holder": "h1", "boots": [[t0 + 5, "OBELISK-GRUB: booting slot A"]],
            "good": [t0 + 60, t0 + 290], "failed": [], "power_off": [[t0 + 191, t0 + 221]]}
    rec = {"t0": t0, "base": "0.1.0", "hosts_info": {"fleet-1": info, "fleet-2": {**info, "holder": "h2"}},
           "phases": [{"name": "roll-1", "seconds": 500.0}],
           "events": [{"time": t0 + 100, "machineid": "m1", "eventtype": 13, "eventresult": 1},
                      {"time": t0 + 150, "machineid": "m1", "eventtype": 3, "eventresult": 1}],
           "lock_samples": [{"time": t0 + 150, "holders": []}, {"time": t0 + 190, "holders": ["h1"]},
                            {"time": t0 + 290, "holders": ["h2"]}, {"time": t0 + 390, "holders": []}]}
    assert ("powered off", t0 + 191, t0 + 221) in timeline.segments(rec)["fleet-1"]
    svg = timeline.write_svg(tmp_path / "t.svg", rec).read_text()
    ET.fromstring(svg)
    assert "powered off: 30s" in svg
    roll = timeline.roll_figures(rec)["roll-1"]
    assert roll == {"took": 500.0, "ideal": 200.0, "ratio": 2.5}


@pytest.mark.timeout(60)
def test_private_net_dhcp_gives_each_mac_its_address(tmp_path: Path) -> None:
    """A client in a second namespace (made by this test, linked only to the first by a veth) asks udhcpd."""
    client = f"obelisk-dhcpc-{os.getpid()}"
    with PrivateNet() as net:
        net.dhcp({"52:54:00:77:00:01": net.address(1)}, tmp_path)
        subprocess.run(["ip", "netns", "add", client], check=True)
        try:
            subprocess.run(["ip", "-n", net.name, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
                            "netns", client], check=True)
            subprocess.run(["ip", "-n", net.name, "link", "set", "v0", "master", net.bridge, "up"], check=True)
            subprocess.run(["ip", "-n", client, "link", "set", "v1", "address", "52:54:00:77:00:01", "up"],
                           check=True)
            res = subprocess.run(["ip", "netns", "exec", client, "busybox", "udhcpc", "-i", "v1", "-n", "-q", "-f",
                                  "-t", "5", "-s", "/bin/true"], capture_output=True, text=True, timeout=40)
            assert f"lease of {net.address(1)} obtained" in res.stdout + res.stderr, res.stdout + res.stderr
        finally:
            subprocess.run(["ip", "netns", "del", client], capture_output=True)


@pytest.mark.timeout(60)
def test_a_run_killed_with_sigterm_or_sighup_takes_its_network_down() -> None:
    """Even when started in the background (SIGINT ignored), a signal ends the run through its cleanup."""
    code = ("import sys, time\nfrom builder.imagetest.fleet import _signals_end_the_run\n"
            "from builder.imagetest.netns import PrivateNet\n"
            "with _signals_end_the_run(), PrivateNet() as net:\n"
            "    print(net.name, flush=True)\n    time.sleep(60)\n")
    for sig in ("TERM", "HUP", "INT"):
        proc = subprocess.Popen(["/bin/sh", "-c", f"trap '' INT; exec {sys.executable} -c \"$0\"", code],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        name = proc.stdout.readline().strip()
        assert name.startswith("obelisk-") and name in _namespaces()
        subprocess.run(["kill", f"-{sig}", str(proc.pid)], check=True)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode != 0 and "interrupted by signal SIG" + sig in err, err[-300:]
        assert name not in _namespaces(), sig
