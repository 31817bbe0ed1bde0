"""FleetLock client: the requests Zincati sends (docs/development/fleetlock/protocol.md).

POST <base>/v1/pre-reboot (recursive lock) and <base>/v1/steady-state (unlock if held), header
`fleet-lock-protocol: true`, body `{"client_params": {"id": ..., "group": ...}}`; 200 is success,
anything else a failure whose JSON body is `{"kind", "value"}`.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from .errors import EtcdUnavailable, LockError, SlotsFull

HEADERS = {"fleet-lock-protocol": "true"}


@dataclass
class FleetLockClient:
    base_url: str
    group: str = "default"
    timeout: float = 30.0
    cafile: str | None = None

    def _post(self, path: str, holder: str) -> None:
        url = self.base_url.rstrip("/") + path
        body = {"client_params": {"id": holder, "group": self.group}}
        try:
            r = requests.post(url, json=body, headers=HEADERS, timeout=self.timeout,
                              verify=self.cafile if self.cafile else True)
        except requests.RequestException as exc:
            raise EtcdUnavailable(f"FleetLock server {self.base_url} unreachable: {exc.__class__.__name__}") from None
        if r.status_code == 200:
            return
        try:
            doc = r.json()
            kind, value = str(doc["kind"]), str(doc["value"])
        except (ValueError, KeyError, TypeError):
            kind, value = f"generic_http_{r.status_code}", r.text[:200]  # what Zincati does with non-JSON errors
        err = SlotsFull if kind == "failed_lock" else LockError
        exc = err(f"FleetLock {path} refused ({r.status_code} {kind}): {value}")
        exc.kind = kind
        raise exc

    def lock(self, holder: str) -> None:
        self._post("/v1/pre-reboot", holder)

    def unlock(self, holder: str) -> bool:
        self._post("/v1/steady-state", holder)
        return True
