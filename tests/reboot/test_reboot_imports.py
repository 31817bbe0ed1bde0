"""What importing the reboot package costs: reading the lock settings at boot must not load the
etcd client or requests, and the lock commands must not load the FleetLock server."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _python(code: str) -> None:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def test_lock_settings_and_the_package_load_neither_etcd3gw_nor_requests() -> None:
    _python("import obelisk.lock_conf, update_engine.reboot; import sys; "
            "assert 'etcd3gw' not in sys.modules and 'requests' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('etcd3gw', 'requests', 'update_engine.reboot.'))]")


def test_lock_commands_do_not_load_the_server() -> None:
    _python("import update_engine.reboot.cli, sys; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'fleetlock_server')]")


def test_names_are_loaded_on_first_use() -> None:
    import update_engine.reboot as reboot
    from update_engine.reboot.coordinator import coordinator_from_config
    from update_engine.reboot.errors import SlotsFull

    assert reboot.coordinator_from_config is coordinator_from_config  # what update_engine/daemon.py uses
    assert reboot.SlotsFull is SlotsFull
    assert {"RebootCoordinator", "host_id", "LockError"} <= set(dir(reboot))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        reboot.nothing  # noqa: B018
