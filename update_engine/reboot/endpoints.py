"""etcd clients for a comma list of member URLs: failover, TLS settings, one-line errors."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from .errors import BadJson, EtcdRefused, EtcdUnavailable, LockError
from .limits import parse_json_bounded

T = TypeVar("T")
# etcd errors about the request itself: every member would refuse it the same way.
REFUSALS = ("request is too large", "too many operations in txn request")


class EtcdEndpoints:
    """etcd3gw clients for a comma list of URLs, one set per thread, failing over on errors.

    etcd3gw talks to one host; a cluster client needs to move on when a member is down, so this
    tries the members in turn (starting with the last that answered) and raises EtcdUnavailable
    naming them all when none answers. etcd answers 503 ("no leader", "request timed out") when
    quorum is lost; that is treated like a dead member, so without quorum nothing succeeds.
    """

    def __init__(self, urls: list[str] | str, *, cafile: str | None = None, certfile: str | None = None,
                 keyfile: str | None = None, timeout: float = 5.0) -> None:
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        if not urls:
            raise LockError("no etcd endpoint given: pass --endpoint http://HOST:2379 or set ENDPOINT in lock.conf")
        self.urls = list(urls)
        for what, path in (("CA file", cafile), ("client certificate", certfile), ("client key", keyfile)):
            if path and not os.access(path, os.R_OK):
                raise LockError(f"{what} {path} is missing or unreadable: check --cafile/--certfile/--keyfile "
                                "(CAFILE/CERTFILE/KEYFILE in lock.conf)")
        self.cafile, self.certfile, self.keyfile = cafile, certfile, keyfile
        self.timeout = timeout
        self._local = threading.local()
        self._preferred = 0

    def _clients(self) -> list[Etcd3Client]:
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = [self._make(u) for u in self.urls]
            self._local.clients = clients
        return clients

    def _make(self, url: str) -> Etcd3Client:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LockError(f"bad etcd URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        # api_path fixed to /v3/ (etcd >= 3.4) so no client spends a round trip on /version discovery.
        session = requests.Session()
        if self.cafile:
            session.verify = self.cafile
            # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's verify (psf/requests#3829):
            # with our own CA we must not read the environment, or the etcd CA is silently ignored.
            session.trust_env = False
        if self.certfile and self.keyfile:
            session.cert = (self.certfile, self.keyfile)
        return Etcd3Client(host=parts.hostname, port=parts.port or 2379, protocol=parts.scheme,
                           timeout=self.timeout, api_path="/v3/", session=session)

    def call(self, fn: Callable[[Etcd3Client], T]) -> T:
        clients = self._clients()
        errors = []
        start = self._preferred
        for i in range(len(clients)):
            idx = (start + i) % len(clients)
            try:
                result = fn(clients[idx])
            except (etcd_exc.Etcd3Exception, OSError) as exc:
                detail = _short(getattr(exc, "detail_text", None) or str(exc) or exc.__class__.__name__)
                if any(r in detail for r in REFUSALS):
                    # Not a dead member: the next one would say the same, and "no quorum" would mislead.
                    raise EtcdRefused(f"etcd refused the request: {self.urls[idx]}: {detail}", detail=detail) from None
                errors.append(f"{self.urls[idx]}: {detail}")
                continue
            self._preferred = idx
            return result
        raise EtcdUnavailable(
            "etcd unavailable (no member answered or the cluster has no quorum): " + "; ".join(errors)
            + "; check the etcd members and retry"
        )


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    try:
        doc = parse_json_bounded(text, "etcd's answer")
        if isinstance(doc, dict):
            text = str(doc.get("error") or doc.get("message") or text)
    except BadJson:
        pass
    if "Connection refused" in text:
        return "connection refused"
    if "certificate verify failed" in text:
        why = text.split("certificate verify failed:")[-1].split("(_ssl")[0].strip(" ')(\"")
        return f"TLS: etcd's certificate is not trusted ({why[:80]}): pass --cafile / set CAFILE to the etcd CA"
    if "SSLEOFError" in text or "certificate required" in text or ("alert" in text.lower() and "SSL" in text):
        return ("TLS handshake refused by etcd: it probably requires a client certificate "
                "(--certfile/--keyfile, CERTFILE/KEYFILE)")
    if "SSLError" in text:
        return "TLS failed: " + text[text.find("SSLError"):][:140]
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timed out" if "etcdserver" not in text else text[:120]
    return text[:160]


