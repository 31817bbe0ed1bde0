"""Reboot coordination: strategies, maintenance windows, the etcd semaphore, FleetLock.

The update daemon uses `coordinator_from_config(...)` and `host_id()` (docs/contracts.md).

Nothing is imported here: the names below are loaded on first use, so a program that only reads
the lock settings (obelisk.lock_conf) or one submodule does not load etcd3gw and requests.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "STRATEGIES": "coordinator", "RebootCoordinator": "coordinator", "StrategyError": "coordinator",
    "coordinator_from_config": "coordinator", "host_id": "identity",
    "CorruptSemaphore": "errors", "EtcdUnavailable": "errors", "LockError": "errors", "SlotsFull": "errors",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
