"""The daemon's side of the Omaha conversation: one POST, bounded in time, size and redirects.

Every exchange has one overall deadline, for connecting, sending and reading the whole answer: a
watchdog shuts the socket down when it passes, so a server that drips one byte a second (in the
headers or the body) cannot hold the daemon past it. The answer is read in pieces and given up at
``MAX_XML`` bytes (a huge body never sits in memory). Redirects are followed at most
``MAX_REDIRECTS`` times and only within the same origin (scheme, host, port): the request carries the
host's identity and must not be re-posted to a host the configured server merely names. Proxies and CA
bundles follow the same settings as the payload download (``requests``' environment rules: the
``PROXY=`` of update.conf, else ``HTTP(S)_PROXY`` / ``NO_PROXY``; ``REQUESTS_CA_BUNDLE``).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

import requests
import requests.certs
import requests.utils

from update_engine import omaha
from update_engine.omaha import Event, OmahaError
from update_engine.transfer import reason

log = logging.getLogger("obelisk.update")

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
READ_PIECE = 64 * 1024
USER_AGENT = omaha.UPDATER_VERSION


@dataclass(frozen=True)
class Limits:
    deadline: float = 60.0  # seconds for the whole exchange
    connect_timeout: float = 30.0
    max_bytes: int = omaha.MAX_XML
    max_redirects: int = MAX_REDIRECTS


@dataclass(frozen=True)
class HostInfo:
    """What a request says about this host (Flatcar's attributes)."""

    appid: str
    version: str
    track: str
    machineid: str
    bootid: str
    board: str
    alephversion: str
    os_sp: str


def _origin(url: str) -> tuple[str, str, int]:
    p = urlsplit(url)
    scheme = p.scheme.lower()
    return scheme, (p.hostname or "").lower(), p.port or (443 if scheme == "https" else 80)


class _Watchdog:
    """Shuts the connection's socket down at the deadline, which ends any blocked connect/send/recv."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float) -> None:
        self.conn = conn
        self.expired = False
        self.timer = threading.Timer(max(0.0, seconds), self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self) -> None:
        self.expired = True
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown: an SSL socket's own would drop its state under the reading thread.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self.timer.cancel()


class Exchange:
    """POST ``body`` to ``url`` under ``limits``; ``post()`` returns (HTTP status, body of a 2xx answer)."""

    def __init__(self, url: str, *, proxy: str | None = None, limits: Limits = Limits()) -> None:
        self.server = url
        self.proxy = proxy
        self.limits = limits

    def _fail(self, why: str, code: int = omaha.ERR_HTTP) -> OmahaError:
        return OmahaError(f"cannot reach update server {self.server}: {why}", code)

    def _settings(self, url: str) -> tuple[str | None, ssl.SSLContext | None]:
        """The proxy for ``url`` (None: direct) and the TLS context, by requests' environment rules."""
        explicit = {"http": self.proxy, "https": self.proxy} if self.proxy else {}
        with requests.Session() as session:
            env = session.merge_environment_settings(url, explicit, None, True, None)
        proxy = requests.utils.select_proxy(url, env["proxies"])
        ctx = None
        if urlsplit(url).scheme.lower() == "https" or (proxy and proxy.lower().startswith("https:")):
            verify = env["verify"]
            bundle = verify if isinstance(verify, str) else requests.certs.where()
            ctx = ssl.create_default_context(**({"capath": bundle} if os.path.isdir(bundle) else {"cafile": bundle}))
        return proxy, ctx

    def _connection(self, url: str, timeout: float) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
        """A connection, the request target and extra headers for ``url`` (direct, via a proxy or a tunnel)."""
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        proxy, ctx = self._settings(url)
        if proxy is None:
            if parts.scheme.lower() == "https":
                return http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx), target, {}
            return http.client.HTTPConnection(host, port, timeout=timeout), target, {}
        pp = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if pp.scheme.lower() != "http" or not pp.hostname:
            raise self._fail(f"proxy {pp.scheme}://{pp.hostname or ''}: only http:// proxies are supported",
                             omaha.ERR_HTTP)
        auth = {}
        if pp.username is not None:
            cred = f"{unquote(pp.username)}:{unquote(pp.password or '')}".encode()
            auth = {"Proxy-Authorization": "Basic " + base64.b64encode(cred).decode()}
        if parts.scheme.lower() == "https":
            conn = http.client.HTTPSConnection(pp.hostname, pp.port or 80, timeout=timeout, context=ctx)
            conn.set_tunnel(host, port, headers=auth)
            return conn, target, {}
        return http.client.HTTPConnection(pp.hostname, pp.port or 80, timeout=timeout), url, auth

    def post(self, body: bytes) -> tuple[int, bytes]:
        deadline = time.monotonic() + self.limits.deadline
        url = self.server
        for _ in range(self.limits.max_redirects + 1):
            status, location, data = self._once(url, body, deadline)
            if status not in REDIRECTS or not location:
                return status, data
            new = urljoin(url, location)
            if _origin(new) != _origin(url):
                raise self._fail(f"it redirected to another host ({_origin(new)[1][:80]}): refused")
            url = new
        raise self._fail(f"more than {self.limits.max_redirects} redirects")

    def _once(self, url: str, body: bytes, deadline: float) -> tuple[int, str, bytes]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._late()
        conn, target, headers = self._connection(url, min(self.limits.connect_timeout, left))
        dog = _Watchdog(conn, left)
        try:
            conn.connect()
            self._check(dog)
            # From here a silent server also ends at the deadline (and says so), not at the connect timeout.
            conn.sock.settimeout(max(0.05, deadline - time.monotonic()))
            conn.request("POST", target, body=body, headers={
                "Content-Type": "text/xml", "User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers})
            self._check(dog)
            resp = conn.getresponse()
            status = resp.status
            if status >= 300:
                return status, resp.getheader("Location") or "", b""
            return status, "", self._read(resp, deadline, dog)
        except OmahaError:
            raise
        except (OSError, http.client.HTTPException, ssl.SSLError, ValueError) as exc:
            if dog.expired or time.monotonic() >= deadline - 0.1:
                raise self._late() from None
            raise self._fail(reason(exc)) from None
        finally:
            dog.cancel()
            conn.close()

    def _read(self, resp: http.client.HTTPResponse, deadline: float, dog: _Watchdog) -> bytes:
        """The answer, in pieces of at most one recv each, never more than ``max_bytes``, never past the deadline."""
        limit = self.limits.max_bytes
        announced = resp.getheader("Content-Length")
        if announced and announced.strip().isdigit() and int(announced) > limit:
            raise OmahaError(f"Omaha response is larger than {limit} bytes ({int(announced)} announced)")
        data = bytearray()
        while True:
            self._check(dog)
            if time.monotonic() > deadline:
                raise self._late()
            piece = resp.read1(READ_PIECE)
            if not piece:
                if dog.expired:
                    raise self._late()
                return bytes(data)
            data += piece
            if len(data) > limit:
                raise OmahaError(f"Omaha response is larger than {limit} bytes")

    def _check(self, dog: _Watchdog) -> None:
        if dog.expired:
            raise self._late()

    def _late(self) -> OmahaError:
        return self._fail(f"no complete answer within {self.limits.deadline:.0f} s")


class OmahaClient:
    """Builds this host's requests and sends them to the update server."""

    def __init__(self, server: str, *, proxy: str | None = None, limits: Limits = Limits()) -> None:
        self.exchange = Exchange(server, proxy=proxy, limits=limits)
        self.server = server

    def request(self, host: HostInfo, *, ping: bool, updatecheck: bool, events: list[Event],
                interactive: bool = False) -> omaha.Response | None:
        app = omaha.AppRequest(appid=host.appid, version=host.version, track=host.track, machineid=host.machineid,
                               bootid=host.bootid, board=host.board, alephversion=host.alephversion, ping=ping,
                               updatecheck=updatecheck, events=events)
        req = omaha.Request(app, installsource="ondemandupdate" if interactive else "scheduler", os_sp=host.os_sp)
        status, data = self.exchange.post(omaha.build_request(req))
        if status >= 300:
            raise OmahaError(f"update server {self.server} answered HTTP {status}",
                             omaha.ERR_OMAHA_HTTP_BASE + min(status, 999))
        if not updatecheck:
            return None  # events are best effort, as in update_engine: any 2xx is fine
        return omaha.parse_response(data)

    def check(self, host: HostInfo, events: list[Event], *, interactive: bool = False) -> omaha.Response:
        resp = self.request(host, ping=True, updatecheck=True, events=events, interactive=interactive)
        assert resp is not None
        return resp

    def ping(self, host: HostInfo) -> None:
        with contextlib.suppress(OmahaError):
            self.request(host, ping=True, updatecheck=False, events=[])

    def event(self, host: HostInfo, ev: Event) -> None:
        """Best effort, like update_engine: a lost event is logged, never fatal."""
        try:
            self.request(host, ping=False, updatecheck=False, events=[ev])
        except OmahaError as exc:
            log.warning("could not report event %s/%s: %s", ev.type, ev.result, exc)
