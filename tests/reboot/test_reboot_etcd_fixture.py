"""The local-etcd fixture itself, started many times in a row: every start gives a cluster whose
members are all healthy and listed as started, and no two servers ever get the same port.

Before tests/ports.py, ports were picked by binding port 0 and closing it; about one 6-port draw
in 800 had a duplicate, so now and then a 3-member cluster came up with 2 members and a fault test
that killed one of them left the fleet without quorum, retrying for ever.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
import requests
from etcdlib import LocalEtcd
from testlib import need_tools

pytestmark = pytest.mark.etcd

SINGLE = 200
TRIPLE = 20


def _start_many(base: Path, members: int, times: int) -> tuple[list[int], int, float]:
    """Start and stop `times` clusters; returns every port used, the clash retries and the time."""
    ports: list[int] = []
    clashes = 0
    t = time.monotonic()
    for i in range(times):
        d = base / f"c{members}-{i}"
        etcd = LocalEtcd(d, members)
        try:
            etcd.start(timeout=20)
            assert all(m.alive for m in etcd.members)
            listed = requests.post(etcd.members[-1].url + "/v3/cluster/member/list", json={}, timeout=5).json()
            assert sorted(m["name"] for m in listed["members"]) == [f"m{j}" for j in range(members)]
            for m in etcd.members:
                assert requests.get(m.url + "/health", timeout=5).json()["health"] == "true"
            ports += [p for m in etcd.members for p in (m.client_port, m.peer_port)]
            clashes += etcd.clashes
        finally:
            etcd.close()
            shutil.rmtree(d, ignore_errors=True)  # etcd preallocates 64 MB of WAL per member
    return ports, clashes, time.monotonic() - t


@pytest.mark.timeout(420)
def test_fixture_started_200_times_gives_healthy_clusters_and_never_a_port_twice(tmp_path: Path) -> None:
    need_tools("etcd")
    ports1, clashes1, took1 = _start_many(tmp_path, 1, SINGLE)
    ports3, clashes3, took3 = _start_many(tmp_path, 3, TRIPLE)
    ports = ports1 + ports3
    assert len(ports) == 2 * SINGLE + 6 * TRIPLE
    assert len(set(ports)) == len(ports), "a port was handed out twice"
    assert clashes1 + clashes3 == 0, f"{clashes1 + clashes3} start(s) lost a port to another process"
    print(f"etcd fixture: {SINGLE} x 1-member in {took1:.1f}s ({took1 / SINGLE * 1000:.0f} ms each), "
          f"{TRIPLE} x 3-member in {took3:.1f}s ({took3 / TRIPLE * 1000:.0f} ms each), all healthy, no port twice")


@pytest.mark.timeout(60)
def test_a_start_that_loses_its_port_is_retried_on_new_ports(tmp_path: Path) -> None:
    """Another process takes a member's port between the check and etcd's bind (here: the test
    listens on it): the start notices etcd's "address already in use" and starts afresh."""
    need_tools("etcd")
    etcd = LocalEtcd(tmp_path / "etcd", 3)
    taken = etcd.members[1].client_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            etcd.start(timeout=20)
            assert etcd.clashes == 1
            assert taken not in [p for m in etcd.members for p in (m.client_port, m.peer_port)]
            assert all(m.alive for m in etcd.members)
            assert "address already in use" in (tmp_path / "etcd" / "m1.log.try1").read_text()
        finally:
            etcd.close()
