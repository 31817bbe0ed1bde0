"""What every endpoint of the provisioning server shares: its settings, the data folder, the releases
under the assets folder, and how a request becomes a group, a profile and template data.

provision.app (the read side) and provision.write_api (the write side) both build on this module
and not on each other.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from provision import render
from provision.metrics import ProvisionMetrics
from provision.releases import Releases
from provision.select import Labels, labels_from_query, select
from provision.store import Store

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


@dataclass
class Settings:
    data: Path
    assets: Path | None = None
    public_url: str | None = None
    allow: list[Network] = field(default_factory=list)  # empty: every client may read
    write_token: str | None = None  # bearer token that opens the write API on every listener
    mtls_ports: set[int] = field(default_factory=set)  # listeners whose TLS handshake verified the client


@dataclass
class Host:
    """What one request resolved to: labels, group, profile, template data."""

    labels: Labels
    ctx: render.Context
    profile_id: str


class Provision:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.store = Store(settings.data)
        self.releases = Releases(settings.assets)
        self.assets_root = settings.assets.resolve() if settings.assets is not None else None
        self.metrics = ProvisionMetrics(self.store)

    def server_url(self, request: Request) -> str:
        if self.s.public_url:
            return self.s.public_url.rstrip("/")
        host = request.headers.get("host", "")
        m = _HOST.fullmatch(host)
        port = m.group(1) or m.group(2) if m else None
        # Never echo a hostile Host header into a boot script; a port out of range would also make
        # the URL unparseable further on (GRUB's device syntax needs the port split out).
        if m is None or (port is not None and not 0 < int(port[1:]) < 65536):
            h, p = request.scope.get("server") or ("127.0.0.1", 80)
            host = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
        return f"{request.url.scheme}://{host}"

    def allowed(self, request: Request) -> bool:
        if not self.s.allow:
            return True
        client = request.client.host if request.client else ""
        try:
            ip = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(ip in net for net in self.s.allow)

    def resolve(self, request: Request) -> Host:
        labels = labels_from_query(request.query_params.multi_items())
        group = select(self.store.groups(), labels)
        ctx = render.Context(group, labels, request.url.query, self.server_url(request))
        return Host(labels, ctx, group.profile)
