"""Real etcd members (Debian etcd-server) on loopback ports never handed out twice (tests/ports.py).

A fixture returns a cluster only once every member is healthy and listed as started
(LocalEtcd.start, which also retries a start that lost a port to another process). Every cluster
is killed in the fixture's finally block, so a failing test leaves no etcd behind.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from etcdlib import LocalEtcd
from testlib import need_tools

_groups = itertools.count()


def _cluster(tmp_path_factory: pytest.TempPathFactory, members: int) -> Iterator[LocalEtcd]:
    need_tools("etcd")
    cluster = LocalEtcd(tmp_path_factory.mktemp(f"etcd{members}"), members)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One member shared by a module's tests (each test uses its own group)."""
    yield from _cluster(tmp_path_factory, 1)


@pytest.fixture
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """A fresh 3-member cluster per test: fault tests kill members."""
    yield from _cluster(tmp_path_factory, 3)


@pytest.fixture
def group() -> str:
    return f"g{next(_groups)}"
