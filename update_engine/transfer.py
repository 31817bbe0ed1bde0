"""Where payload bytes come from: a local file or HTTP(S) with Range resume, retries and a rate cap.

HTTP follows update_engine's transfer rules: connect within 30 s, abort when fewer than 10 B/s
arrive for 90 s, up to 20 retries from the last checkpoint (a 4xx is final), an optional
bandwidth limit, at most five redirects. Every network problem is a :class:`TransferFailed` (worth
a retry); anything else the source refuses is an :class:`ApplyError` with its Omaha code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import requests

from obelisk.inputs import InputFileError, check_input
from update_engine import omaha
from update_engine.errors import ApplyError, Stopped

MAX_REDIRECTS = 5


@dataclass
class Transfer:
    """HTTP behaviour, update_engine's defaults: connect 30 s, abort below 10 B/s for 90 s, 20 retries."""

    connect_timeout: float = 30.0
    low_speed_limit: int = 10  # bytes/s
    low_speed_time: float = 90.0
    retries: int = 20
    retry_delay: float = 2.0
    bandwidth: int = 0  # bytes/s, 0 = unlimited
    proxy: str | None = None
    checkpoint_bytes: int = 16 << 20


class Stream(Protocol):
    def read(self, n: int) -> bytes: ...
    def readinto(self, buf: memoryview) -> int: ...
    def close(self) -> None: ...


class TransferFailed(ApplyError):
    """A network problem, worth a retry from the last checkpoint unless ``final`` (or an HTTP 4xx)."""

    def __init__(self, message: str, http_status: int | None = None, *, final: bool = False) -> None:
        super().__init__(message, omaha.ERR_DOWNLOAD_TRANSFER)
        self.http_status = http_status
        self.final = final or (http_status is not None and 400 <= http_status < 500)


def reason(exc: BaseException) -> str:
    """One short line for a network exception (requests, urllib3 and http.client raise many kinds)."""
    text = str(exc) or type(exc).__name__
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "the server stopped sending (timed out)"
    return text.splitlines()[0][:200]


class FileStream:
    def __init__(self, path: Path, offset: int) -> None:
        try:
            self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise ApplyError(f"cannot read payload {path}: {exc.strerror}", omaha.ERR_DOWNLOAD_TRANSFER) from None
        self.f.seek(offset)

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def readinto(self, buf: memoryview) -> int:
        return self.f.readinto(buf) or 0

    def close(self) -> None:
        self.f.close()


class HttpStream:
    """A GET from ``offset`` (HTTP Range), with update_engine's slow-retrieval abort and a rate cap."""

    def __init__(self, session: requests.Session, url: str, offset: int, t: Transfer) -> None:
        self.t = t
        # identity: the bytes on the wire must be the payload's bytes (hashes, Range offsets).
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        read_timeout = max(1.0, t.low_speed_time)
        try:
            self.resp = session.get(url, headers=headers, stream=True, timeout=(t.connect_timeout, read_timeout))
        except requests.TooManyRedirects:
            raise TransferFailed(f"cannot fetch {url}: more than {MAX_REDIRECTS} redirects", final=True) from None
        except requests.RequestException as exc:
            raise TransferFailed(f"cannot fetch {url}: {reason(exc)}") from None
        if self.resp.status_code >= 400:
            code = self.resp.status_code
            self.resp.close()
            raise TransferFailed(f"{url}: HTTP {code}", http_status=code)
        if offset and self.resp.status_code != 206:
            self.resp.close()
            raise TransferFailed(f"{url}: server ignored the Range request (HTTP {self.resp.status_code})")
        self.window_start = time.monotonic()
        self.window_bytes = 0
        self.rate_start = time.monotonic()
        self.rate_bytes = 0

    def read(self, n: int) -> bytes:
        # Through the same http.client response as readinto: mixing urllib3's read() with reads behind its back
        # made urllib3 count those bytes as missing and raise IncompleteRead at the end (a spurious retry).
        fp = getattr(self.resp.raw, "_fp", None)
        try:
            data = fp.read(n) if fp is not None else self.resp.raw.read(n, decode_content=False)
        except Exception as exc:  # urllib3 raises several kinds (timeouts, protocol errors)
            raise TransferFailed(f"download failed: {reason(exc)}") from None
        self._account(len(data))
        return data

    def readinto(self, buf: memoryview) -> int:
        # http.client's readinto fills our buffer without the copies urllib3's read() makes.
        fp = getattr(self.resp.raw, "_fp", None)
        try:
            if fp is not None and hasattr(fp, "readinto"):
                n = fp.readinto(buf) or 0
                if n == 0 and len(buf) and fp.length not in (None, 0):
                    raise TransferFailed("download failed: connection closed before the announced length")
            else:
                data = self.resp.raw.read(len(buf), decode_content=False)
                n = len(data)
                buf[:n] = data
        except TransferFailed:
            raise
        except Exception as exc:  # http.client / urllib3 raise several kinds (timeouts, incomplete reads)
            raise TransferFailed(f"download failed: {reason(exc)}") from None
        self._account(n)
        return n

    def _account(self, nbytes: int) -> None:
        now = time.monotonic()
        self.window_bytes += nbytes
        if now - self.window_start >= self.t.low_speed_time:
            if self.window_bytes < self.t.low_speed_limit * (now - self.window_start):
                raise TransferFailed(
                    f"download slower than {self.t.low_speed_limit} B/s for {self.t.low_speed_time:.0f}s")
            self.window_start, self.window_bytes = now, 0
        if self.t.bandwidth:
            self.rate_bytes += nbytes
            ahead = self.rate_bytes / self.t.bandwidth - (now - self.rate_start)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        self.resp.close()


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class Source:
    """A payload's origin. ``local_ok=False`` (the daemon, whose sources come from Omaha) accepts only URLs."""

    def __init__(self, source: str, t: Transfer, *, local_ok: bool = True) -> None:
        self.source = source
        self.t = t
        self.is_url = is_url(source)
        self.session: requests.Session | None = None
        if self.is_url:
            self.session = requests.Session()
            self.session.max_redirects = MAX_REDIRECTS
            self.session.trust_env = t.proxy is None
            if t.proxy:
                self.session.proxies = {"http": t.proxy, "https": t.proxy}
        elif not local_ok:
            # Refused before the path is looked at: the outcome must not depend on what exists on this host.
            raise ApplyError(f"payload source {source[:80]!r} is not an http(s):// URL", omaha.ERR_OMAHA_INVALID)
        elif not os.path.lexists(source):
            raise ApplyError(f"payload {source} does not exist: pass a file or an http(s):// URL",
                             omaha.ERR_DOWNLOAD_TRANSFER)
        else:
            try:
                check_input(source, "payload")  # a FIFO would block the read forever
            except InputFileError as exc:
                raise ApplyError(str(exc), omaha.ERR_DOWNLOAD_TRANSFER) from None

    def open(self, offset: int) -> Stream:
        if self.session is not None:
            return HttpStream(self.session, self.source, offset, self.t)
        return FileStream(Path(self.source), offset)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


class Retrier:
    """Retries with a fixed delay that a stop request cuts short (``Stopped``)."""

    def __init__(self, t: Transfer, should_stop: Callable[[], bool]) -> None:
        self.t = t
        self.should_stop = should_stop

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.should_stop():
                raise Stopped()
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    def open(self, src: Source, offset: int) -> Stream:
        """``src.open(offset)``, retried on network failures; a 4xx is the server's considered answer."""
        attempt = 0
        while True:
            try:
                return src.open(offset)
            except TransferFailed as exc:
                if exc.final or attempt >= self.t.retries:
                    raise
                attempt += 1
                self.sleep(self.t.retry_delay)
