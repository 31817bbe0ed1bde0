"""A small client for `/api/v1/fleet`: one request, one JSON answer, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from obelisk.errors import EXIT_FAILED, ObeliskError

TIMEOUT = 30.0


class FleetError(ObeliskError):
    """The server refused a request (its one-line reason) or could not be reached."""


class FleetUnreachable(FleetError):
    exit_code = EXIT_FAILED


@dataclass
class Client:
    server: str
    token: str

    def url(self, path: str) -> str:
        return self.server.rstrip("/") + "/api/v1/fleet" + path

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any) -> Any:
        return self._call("POST", path, json=body)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = requests.request(method, self.url(path), headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=TIMEOUT, **kw)
        except requests.RequestException as exc:
            raise FleetUnreachable(f"cannot reach the update server at {self.server}: {type(exc).__name__}",
                                   hint="check --server (or OBELISK_FLEET_SERVER) and that the server runs") from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            why = data.get("error") if isinstance(data, dict) else r.text.strip()[:200]
            raise FleetError(f"the server refused it ({r.status_code}): {why or r.reason}")
        if data is None:
            raise FleetError(f"the server at {self.server} did not answer JSON (is it an obelisk update server?)")
        return data


def seg(name: str) -> str:
    """One path segment, escaped (the server checks names; the client only keeps them in one piece)."""
    return quote(name, safe="")
