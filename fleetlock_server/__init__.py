"""FleetLock server (Airlock's role) backed by obelisk's etcd semaphore: `obelisk lock serve`."""

from .app import make_app

__all__ = ["make_app"]
