"""The reboot lock's errors. `kind` is the FleetLock error kind the server answers with."""

from __future__ import annotations

from obelisk.errors import ObeliskError


class LockError(ObeliskError, RuntimeError):
    """A lock operation failed; str() is one line for the user."""

    kind = "failed_lock"


class EtcdUnavailable(LockError):
    kind = "etcd_unavailable"


class EtcdRefused(LockError):
    """etcd answered, and refused the request itself (asking another member would not help)."""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail  # etcd's own words, e.g. "etcdserver: request is too large"


class CorruptSemaphore(LockError):
    kind = "corrupt_semaphore"


class SemaphoreTooBig(LockError):
    """The write would not fit in one etcd request (etcd's --max-request-bytes)."""

    kind = "semaphore_too_big"


class SlotsFull(LockError):
    kind = "failed_lock"


class SemaphoreConflict(LockError):
    kind = "conflict"


class BadLockId(LockError):
    """A holder id Airlock could not share (empty, too long, control characters)."""

    kind = "invalid_client_identity"


class BadSlotCount(LockError):
    kind = "invalid_slot_count"


class BadJson(ObeliskError, ValueError):
    """A JSON document that cannot be read safely (not JSON, or nested too deeply)."""
