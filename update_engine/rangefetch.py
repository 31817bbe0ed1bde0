"""Byte ranges of a payload, one Range request each, several in flight (the adaptive path's network side).

An answer is taken only if it is exactly what was asked: ``206``, not multipart, a ``Content-Range`` of
``bytes A-B/SIZE`` naming the range asked and the payload's size, and exactly ``B - A + 1`` body bytes.
Anything else (a 200 with the whole file, another range, an overlapping or short one, a multipart
answer nobody asked for, a different size) is a :class:`RangeUnusable`: the caller then reads the
payload front to back instead. Network trouble is a ``TransferFailed``, retried here a few times.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
import time
from pathlib import Path

import requests

from update_engine import omaha
from update_engine import transfer as tx
from update_engine.errors import ApplyError
from update_engine.transfer import Transfer, TransferFailed

IN_FLIGHT = 4  # requests at once
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class RangeUnusable(ApplyError):
    """The server does not answer Range requests as asked: fall back to the full payload."""

    def __init__(self, message: str) -> None:
        super().__init__(message, omaha.ERR_DOWNLOAD_TRANSFER)


class RangeFetcher:
    """``fetch(offset, length)`` from a payload URL or file; ``submit`` runs it in a small thread pool."""

    def __init__(self, source: str, size: int | None, t: Transfer, *, retries: int = 3) -> None:
        self.source, self.size, self.t, self.retries = source, size, t, retries
        self.is_url = tx.is_url(source)
        self.served = 0  # body bytes received
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []
        self._rate_start = time.monotonic()
        self._rate_bytes = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="range-fetch")

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.max_redirects = tx.MAX_REDIRECTS
            s.trust_env = self.t.proxy is None
            if self.t.proxy:
                s.proxies = {"http": self.t.proxy, "https": self.t.proxy}
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def submit(self, offset: int, length: int) -> concurrent.futures.Future:
        return self.pool.submit(self.fetch, offset, length)

    def fetch(self, offset: int, length: int) -> bytes:
        if not self.is_url:
            fd = os.open(Path(self.source), os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, length, offset)
            finally:
                os.close(fd)
            if len(data) != length:
                raise RangeUnusable(f"payload file {self.source} ends before byte {offset + length}")
            self._account(length)
            return data
        attempt = 0
        while True:
            try:
                return self._get(offset, length)
            except TransferFailed as exc:
                if exc.final or attempt >= self.retries:
                    raise
                attempt += 1
                time.sleep(self.t.retry_delay)

    def _get(self, offset: int, length: int) -> bytes:
        end = offset + length - 1
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={offset}-{end}"}
        try:
            resp = self._session().get(self.source, headers=headers, stream=True,
                                       timeout=(self.t.connect_timeout, max(1.0, self.t.low_speed_time)))
        except requests.TooManyRedirects:
            raise TransferFailed(f"cannot fetch {self.source}: more than {tx.MAX_REDIRECTS} redirects",
                                 final=True) from None
        except requests.RequestException as exc:
            raise TransferFailed(f"cannot fetch {self.source}: {tx.reason(exc)}") from None
        with resp:
            if resp.status_code >= 400:
                raise TransferFailed(f"{self.source}: HTTP {resp.status_code}", http_status=resp.status_code)
            if resp.status_code != 206:
                raise RangeUnusable(f"the server ignored a Range request (HTTP {resp.status_code} instead of 206)")
            ctype = resp.headers.get("Content-Type", "")
            if ctype.lower().startswith("multipart/"):
                raise RangeUnusable(f"the server answered one range with a multipart body ({ctype[:60]})")
            got = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "").strip())
            size_ok = got is not None and (self.size is None or got[3] in ("*", str(self.size)))
            if not got or not size_ok or (int(got[1]), int(got[2])) != (offset, end):
                raise RangeUnusable(f"the server answered bytes {offset}-{end} with Content-Range "
                                    f"{resp.headers.get('Content-Range', '(none)')[:80]!r}")
            try:
                body = resp.raw.read(length + 1, decode_content=False)
            except Exception as exc:  # urllib3 raises several kinds (timeouts, protocol errors)
                raise TransferFailed(f"download failed: {tx.reason(exc)}") from None
        if len(body) != length:
            raise RangeUnusable(f"the server sent {len(body)} bytes for a range of {length}")
        self._account(length)
        return body

    def _account(self, n: int) -> None:
        with self._lock:
            self.served += n
            if not self.t.bandwidth:
                return
            self._rate_bytes += n
            ahead = self._rate_bytes / self.t.bandwidth - (time.monotonic() - self._rate_start)
        if ahead > 0:
            time.sleep(ahead)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()
