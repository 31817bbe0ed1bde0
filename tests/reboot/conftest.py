"""Real etcd members (Debian etcd-server) on loopback ports picked per test run.

Every cluster is killed in the fixture's finally block, so a failing test leaves no etcd behind.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from testlib import need_tools

from update_engine.reboot.etcd_local import LocalEtcd

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
