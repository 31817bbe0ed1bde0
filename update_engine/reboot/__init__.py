"""Reboot coordination: strategies, maintenance windows, the etcd semaphore, FleetLock.

The update daemon uses `coordinator_from_config(...)` and `host_id()` (docs/contracts.md).
"""

from .coordinator import STRATEGIES, RebootCoordinator, StrategyError, coordinator_from_config
from .identity import host_id
from .semaphore import CorruptSemaphore, EtcdUnavailable, LockError, SlotsFull

__all__ = [
    "STRATEGIES", "CorruptSemaphore", "EtcdUnavailable", "LockError", "RebootCoordinator", "SlotsFull",
    "StrategyError", "coordinator_from_config", "host_id",
]
