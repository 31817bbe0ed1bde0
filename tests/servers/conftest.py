"""Server helpers live in srv_helpers.py (a plain module, so tests can import them too)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from srv_helpers import Served, start_lock_server, start_update_server
from testlib import stop_process


@pytest.fixture
def update_server(tmp_path: Path) -> Iterator:
    """update_server(*extra_args) -> Served: the real `obelisk update serve` over one release; stopped by PID."""
    procs: list[Served] = []

    def _start(*extra: str) -> Served:
        s = start_update_server(tmp_path, *extra)
        procs.append(s)
        return s

    yield _start
    for s in procs:
        stop_process(s.proc)


@pytest.fixture
def lock_server(tmp_path: Path) -> Iterator:
    """lock_server(etcd_urls, *extra_args) -> Served: the real `obelisk lock serve`; stopped by PID."""
    procs: list[Served] = []

    def _start(etcd: str, *extra: str) -> Served:
        s = start_lock_server(tmp_path, etcd, *extra)
        procs.append(s)
        return s

    yield _start
    for s in procs:
        stop_process(s.proc)
