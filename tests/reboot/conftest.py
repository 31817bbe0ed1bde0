"""Real etcd members (Debian etcd-server) on loopback ports picked per test run.

Every cluster is killed in the fixture's finally block, so a failing test leaves no etcd behind.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from update_engine.reboot.etcd_local import LocalEtcd

_groups = itertools.count()


def need_tools(*tools: str) -> None:
    """Fail (not skip) when etcd is missing: `make setup` installs it."""
    import shutil

    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing tools {missing}: run 'make setup' (etcd comes from etcd-server)")


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One member shared by a module's tests (each test uses its own group)."""
    need_tools("etcd")
    cluster = LocalEtcd(tmp_path_factory.mktemp("etcd1"), 1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """A fresh 3-member cluster per test: fault tests kill members."""
    need_tools("etcd")
    cluster = LocalEtcd(tmp_path_factory.mktemp("etcd3"), 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def group() -> str:
    return f"g{next(_groups)}"
