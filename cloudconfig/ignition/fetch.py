"""Resources named by a config: data: URLs and http(s), verified, decompressed, bounded.

Every fetch has a size bound (on the bytes read and, for gzip, on the bytes it inflates to), a
bounded number of redirects, a timeout on each read (Ignition's ``httpResponseHeaders``, 10 s by
default) and an overall deadline (``httpTotal``, or FETCH_DEADLINE when the config sets none: an
unlimited total would let a trickling server hold the first boot forever). The hash of
``verification.hash`` is checked on the decompressed bytes, as the spec says. Proxy settings come
from the config only (``trust_env`` is off: the first boot has no environment worth trusting).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
import time
import urllib.parse
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import requests

from obelisk.errors import EXIT_FAILED, ObeliskError

MAX_RESOURCE = 64 * 1024 * 1024  # one file, fragment or config after decompression
MAX_REDIRECTS = 5
HEADER_TIMEOUT = 10.0  # Ignition's default httpResponseHeaders
FETCH_DEADLINE = 900.0  # when httpTotal is 0 (Ignition: no limit)
ATTEMPTS = 3
HASHES = {"sha512": 128, "sha256": 64}
USER_AGENT = "obelisk-ignition (spec 3.4.0)"
ACCEPT_CONFIG = "application/vnd.coreos.ignition+json;version=3.4.0, */*;q=0.1"
_CHUNK = 64 * 1024


class FetchError(ObeliskError):
    """A resource could not be fetched, decompressed or verified; nothing was changed."""

    exit_code = EXIT_FAILED


class DataURLError(ObeliskError, ValueError):
    """Not an RFC 2397 data URL."""


def describe(source: str) -> str:
    """How a source is named in messages: a data URL may hold a secret, so never its contents."""
    return "a data: URL" if source[:5].lower() == "data:" else source


def parse_data_url(url: str, limit: int = MAX_RESOURCE) -> bytes:
    """data:[<mediatype>][;base64],<data> -> bytes (RFC 2397); the data part is percent-decoded."""
    if url[:5].lower() != "data:":
        raise DataURLError("does not start with data:")
    head, sep, body = url[5:].partition(",")
    if not sep:
        raise DataURLError("has no ',' before the data")
    params = head.split(";")
    if params[0] and not re.fullmatch(r"[!#$&^_.+\w-]+/[!#$&^_.+\w-]+", params[0]):
        raise DataURLError(f"has an invalid media type {params[0][:40]!r}")
    b64 = params[-1].lower() == "base64" and len(params) > 1
    for p in params[1:len(params) - (1 if b64 else 0)]:
        if "=" not in p:
            raise DataURLError(f"has an invalid parameter {p[:40]!r}")
    if len(body) > 4 * limit:
        raise DataURLError(f"holds more than {limit} bytes")
    data = urllib.parse.unquote_to_bytes(body)
    if b64:
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise DataURLError("is marked base64 but its data is not valid base64") from None
    if len(data) > limit:
        raise DataURLError(f"holds more than {limit} bytes")
    return data


def gunzip(data: bytes, limit: int = MAX_RESOURCE) -> bytes:
    """Inflate gzip (all members, as Go's reader does) without ever holding more than ``limit`` bytes."""
    out = bytearray()
    rest = data
    while True:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise ValueError(f"not valid gzip data ({exc})") from None
        if len(out) > limit:
            raise ValueError(f"inflates to more than {limit} bytes")
        if d.unconsumed_tail:
            raise ValueError(f"inflates to more than {limit} bytes")
        if not d.eof:
            raise ValueError("gzip data is truncated")
        rest = d.unused_data
        if not rest:
            return bytes(out)


def hash_problem(data: bytes, spec: str | None) -> str | None:
    """None when ``data`` matches ``sha512-<hex>``/``sha256-<hex>`` (or no hash is given), else why not."""
    if not spec:
        return None
    fn, _, want = spec.partition("-")
    got = hashlib.new(fn, data).hexdigest()
    if got != want.lower():
        return f"hash mismatch: expected {fn}-{want[:16]}..., got {fn}-{got[:16]}..."
    return None


class Fetcher:
    """Fetches data:, http: and https: sources for one provisioning run (configure() per config)."""

    def __init__(self, *, attempts: int = ATTEMPTS, max_redirects: int = MAX_REDIRECTS,
                 limit: int = MAX_RESOURCE, sleep: Callable[[float], None] = time.sleep) -> None:
        self.attempts = max(1, attempts)
        self.limit = limit
        self.sleep = sleep
        self.header_timeout: float | None = HEADER_TIMEOUT
        self.total: float = FETCH_DEADLINE
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.max_redirects = max_redirects
        self._ca_file: str | None = None
        self.fetched = 0  # bytes, for the report

    def close(self) -> None:
        self.session.close()
        if self._ca_file:
            os.unlink(self._ca_file)
            self._ca_file = None

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- settings from ignition.{timeouts,proxy,security} ---------------------------------------
    def configure(self, ignition: dict[str, Any]) -> None:
        t = ignition.get("timeouts", {})
        if "httpResponseHeaders" in t:
            self.header_timeout = float(t["httpResponseHeaders"]) or None
        if "httpTotal" in t:
            self.total = float(t["httpTotal"]) or FETCH_DEADLINE
        p = ignition.get("proxy", {})
        proxies: dict[str, str] = {}
        if p.get("httpProxy"):
            proxies["http"] = proxies["https"] = p["httpProxy"]
        if p.get("httpsProxy"):
            proxies["https"] = p["httpsProxy"]
        if p.get("noProxy"):
            proxies["no_proxy"] = ",".join(p["noProxy"])
        self.session.proxies = proxies
        cas = ignition.get("security", {}).get("tls", {}).get("certificateAuthorities", [])
        if cas:
            self._set_cas([self.fetch_resource(ca, what="certificate authority") for ca in cas])

    def _set_cas(self, bundles: Sequence[bytes]) -> None:
        """Extra CAs are added to the system's, as the spec says (requests takes one bundle file)."""
        base = requests.certs.where()
        with open(base, "rb") as f:
            data = f.read()
        data += b"\n" + b"\n".join(bundles) + b"\n"
        fd, path = tempfile.mkstemp(prefix="obelisk-ignition-ca.", suffix=".pem")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if self._ca_file:
            os.unlink(self._ca_file)
        self._ca_file = path
        self.session.verify = path

    # --- fetching --------------------------------------------------------------------------------
    def fetch_resource(self, res: dict[str, Any], *, what: str = "file", accept: str | None = None) -> bytes:
        """A validated Resource object (source, compression, httpHeaders, verification) -> its bytes."""
        headers = [(h["name"], h["value"]) for h in res.get("httpHeaders", []) if h.get("value")]
        return self.fetch(res.get("source") or "", compression=res.get("compression"), headers=headers,
                          hash=res.get("verification", {}).get("hash"), what=what, accept=accept)

    def fetch(self, source: str, *, compression: str | None = None, headers: Sequence[tuple[str, str]] = (),
              hash: str | None = None, what: str = "file", accept: str | None = None) -> bytes:
        scheme = source.split(":", 1)[0].lower() if ":" in source else ""
        try:
            if source == "":
                data = b""  # an empty source is an empty file (Ignition's fetcher does the same)
            elif scheme == "data":
                data = parse_data_url(source, self.limit)
            elif scheme in ("http", "https"):
                data = self._http(source, headers, accept)
            else:
                raise FetchError(f"{what} from {describe(source)}: obelisk fetches data:, http: and https: only")
            if compression == "gzip":
                data = gunzip(data, self.limit)
        except (DataURLError, ValueError) as exc:
            raise FetchError(f"{what} from {describe(source)}: {exc}") from None
        problem = hash_problem(data, hash)
        if problem:
            raise FetchError(f"{what} from {describe(source)}: {problem}; nothing was changed")
        self.fetched += len(data)
        return data

    def _http(self, url: str, headers: Sequence[tuple[str, str]], accept: str | None) -> bytes:
        deadline = time.monotonic() + self.total
        last = ""
        for attempt in range(self.attempts):
            if attempt:
                self.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            try:
                return self._http_once(url, headers, accept, deadline)
            except _Retry as exc:
                last = str(exc)
                if time.monotonic() >= deadline:
                    break
        raise FetchError(f"{url}: {last} (after {self.attempts} attempt(s))")

    def _http_once(self, url: str, headers: Sequence[tuple[str, str]], accept: str | None,
                   deadline: float) -> bytes:
        h = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if accept:
            h["Accept"] = accept
        h.update(dict(headers))
        # each read waits at most httpResponseHeaders, and never past the overall deadline (so that
        # httpResponseHeaders: 0, "no timeout", still cannot hold the first boot forever)
        left = max(deadline - time.monotonic(), 0.001)
        wait = left if self.header_timeout is None else min(self.header_timeout, left)
        timeout = (wait, wait)
        try:
            with self.session.get(url, headers=h, stream=True, timeout=timeout, allow_redirects=True) as resp:
                if resp.status_code >= 500:
                    raise _Retry(f"HTTP {resp.status_code} {resp.reason}")
                if resp.status_code != 200:
                    raise FetchError(f"{url}: HTTP {resp.status_code} {resp.reason}")
                length = resp.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > self.limit:
                    raise FetchError(f"{url}: is {length} bytes, more than the limit of {self.limit}")
                out = bytearray()
                for chunk in resp.iter_content(_CHUNK):
                    out += chunk
                    if len(out) > self.limit:
                        raise FetchError(f"{url}: is more than the limit of {self.limit} bytes")
                    if time.monotonic() > deadline:
                        raise FetchError(f"{url}: not complete after {self.total:g} s (httpTotal)")
                return bytes(out)
        except requests.exceptions.TooManyRedirects:
            raise FetchError(f"{url}: more than {self.session.max_redirects} redirects") from None
        except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidURL) as exc:
            raise FetchError(f"{url}: redirected to an unusable URL ({_short(exc)})") from None
        except requests.exceptions.SSLError as exc:
            raise FetchError(f"{url}: TLS verification failed ({_short(exc)}); add the CA under "
                             "ignition.security.tls.certificateAuthorities") from None
        except requests.exceptions.Timeout:
            raise _Retry(self._timed_out()) from None
        except requests.exceptions.ConnectionError as exc:
            if "timed out" in str(exc):  # a read timeout while streaming the body surfaces as this
                raise _Retry(self._timed_out()) from None
            raise _Retry(f"cannot connect ({_short(exc)})") from None
        except requests.exceptions.ChunkedEncodingError as exc:
            raise _Retry(f"the connection broke ({_short(exc)})") from None
        except requests.exceptions.RequestException as exc:
            raise FetchError(f"{url}: {_short(exc)}") from None


    def _timed_out(self) -> str:
        if self.header_timeout is None:
            return f"no response within {self.total:g} s (ignition.timeouts.httpTotal)"
        return f"no response within {self.header_timeout:g} s (ignition.timeouts.httpResponseHeaders)"


class _Retry(Exception):
    """A failure worth another attempt (connection, timeout, 5xx)."""


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return m.group(1).strip() if m else text[:160]
