"""Where user-data comes from: a file, a URL on the kernel command line (cloud-config-url= or
Ignition's ignition.config.url=), an OpenStack config drive, a NoCloud seed, or EC2 instance
metadata (IMDSv2 first, IMDSv1 as fallback).

Sources are probed in that order. Local sources are looked at once; network sources retry with
exponential backoff, like coreos-cloudinit's HTTP client: 4xx means "no user-data here"
(no retry), 5xx and connection errors are retried until the attempts run out.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import requests
import urllib3
import yaml

from cloudconfig.validate import MAX_USERDATA, DecompressedTooLarge, gunzip
from obelisk.errors import ObeliskError
from obelisk.inputs import check_input

ORDER = ("file", "url", "configdrive", "nocloud", "ec2")
DEFAULT_FILES = ("/var/lib/obelisk/user_data", "/usr/share/oem/cloud-config.yml")
CONFIGDRIVE_DIRS = ("/media/configdrive", "/media/configvirtfs")
CONFIGDRIVE_LABELS = ("config-2", "CONFIG-2")
NOCLOUD_DIRS = ("/var/lib/cloud/seed/nocloud",)
NOCLOUD_LABELS = ("CIDATA", "cidata")
EC2_ENDPOINT = "http://169.254.169.254"
MAX_METADATA = 1024 * 1024  # one metadata answer or file (keys, hostname, meta_data.json)
MAX_CMDLINE = 64 * 1024
MAX_KEYS = 100  # public keys in EC2 metadata
_CHUNK = 64 * 1024


class DatasourceError(ObeliskError, RuntimeError):
    """A source was asked for explicitly and could not be read; one line, for the user."""


@dataclass
class Metadata:
    hostname: str | None = None
    public_keys: list[str] = field(default_factory=list)
    private_ipv4: str | None = None
    public_ipv4: str | None = None
    private_ipv6: str | None = None
    public_ipv6: str | None = None
    instance_id: str | None = None

    def addresses(self) -> dict[str, str]:
        return {k: v for k in ("private_ipv4", "public_ipv4", "private_ipv6", "public_ipv6")
                if (v := getattr(self, k))}


@dataclass
class Fetched:
    source: str  # e.g. "ec2 (http://169.254.169.254)"
    userdata: bytes
    metadata: Metadata = field(default_factory=Metadata)


@dataclass
class Settings:
    """Everything a probe looks at; tests point these at temporary files and loopback servers."""
    file: Path | None = None
    cmdline: Path = Path("/proc/cmdline")
    configdrive_dirs: tuple[str, ...] = CONFIGDRIVE_DIRS
    configdrive_labels: tuple[str, ...] = CONFIGDRIVE_LABELS
    nocloud_dirs: tuple[str, ...] = NOCLOUD_DIRS
    nocloud_labels: tuple[str, ...] = NOCLOUD_LABELS
    by_label: Path = Path("/dev/disk/by-label")
    ec2_endpoint: str = EC2_ENDPOINT
    timeout: float = 10.0  # per request (connect, and each read of the answer)
    body_deadline: float = 120.0  # for a whole answer: a server trickling bytes cannot hold apply forever
    attempts: int = 5
    backoff: float = 0.05  # first retry delay; doubles, capped at max_backoff
    max_backoff: float = 5.0
    log: Callable[[str], None] = lambda _msg: None


# --- HTTP with coreos-cloudinit's retry rules ----------------------------------------------------

class _NotFound(Exception):
    pass


class Unreachable(DatasourceError):
    """No answer (connection refused, timeouts, 5xx) after the last attempt."""


def _too_large(url: str, limit: int) -> DatasourceError:
    return DatasourceError(f"{url}: the answer is larger than {limit} bytes (the limit); nothing was applied")


def _body(r: requests.Response, url: str, s: Settings, limit: int) -> bytes:
    """The answer's bytes, read as they arrive and never more than ``limit`` of them (nor of their gunzip)."""
    declared = r.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(url, limit)
    encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise DatasourceError(f"{url}: the answer is encoded as {encoding[:40]!r}; only gzip or none is read")
    body = bytearray()
    deadline = time.monotonic() + s.body_deadline
    while chunk := r.raw.read1(_CHUNK, decode_content=False):  # read1: whatever has arrived, up to a chunk
        body += chunk
        if len(body) > limit:
            raise _too_large(url, limit)
        if time.monotonic() > deadline:
            raise DatasourceError(f"{url}: the answer took more than {s.body_deadline:g} s to arrive; "
                                  "nothing was applied")
    if encoding in ("gzip", "x-gzip"):
        try:
            return gunzip(bytes(body), limit)
        except DecompressedTooLarge:
            raise _too_large(url, limit) from None
        except ValueError as exc:
            raise DatasourceError(f"{url}: the answer says gzip but does not decompress ({exc})") from None
    return bytes(body)


def http_get(url: str, s: Settings, *, headers: dict[str, str] | None = None, method: str = "GET",
             attempts: int | None = None, limit: int = MAX_METADATA) -> bytes:
    """Body of a 2xx answer (at most ``limit`` bytes); _NotFound for 4xx; DatasourceError after the last
    failed attempt, or at once for an answer over the limit."""
    if not url.startswith(("http://", "https://")):
        raise DatasourceError(f"{url}: only http:// and https:// URLs are fetched")
    delay = s.backoff
    last = ""
    n = attempts or s.attempts
    # identity: the body is counted as it arrives; a gzip answer anyway is unpacked by gunzip() with the limit
    headers = {"Accept-Encoding": "identity", **(headers or {})}
    for i in range(n):
        try:
            with requests.request(method, url, headers=headers, timeout=s.timeout, allow_redirects=True,
                                  stream=True) as r:
                if 200 <= r.status_code < 300:
                    return _body(r, url, s, limit)
                if 400 <= r.status_code < 500:
                    raise _NotFound(f"{url}: HTTP {r.status_code}")
                last = f"HTTP {r.status_code}"
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            last = type(exc).__name__
        s.log(f"{method} {url} failed ({last}), attempt {i + 1} of {n}")
        if i + 1 < n:
            time.sleep(delay)
            delay = min(delay * 2, s.max_backoff)
    raise Unreachable(f"{url}: no answer after {n} attempts ({last})")


# --- the sources ---------------------------------------------------------------------------------

def read_file(path: str | os.PathLike[str], what: str = "user-data file", limit: int = MAX_USERDATA) -> bytes:
    """A user-named file: never a FIFO or device (check_input), never more than ``limit`` bytes in memory."""
    p = check_input(path, what)
    try:
        # O_NONBLOCK: a FIFO swapped in after the check still cannot block the open
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DatasourceError(f"cannot read {p}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DatasourceError(f"{p}: not a regular file; give a {what}")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise DatasourceError(f"cannot read {p}: {exc.strerror}") from None
    if len(data) > limit:
        raise DatasourceError(f"{p}: larger than {limit} bytes (the limit for a {what})")
    return data


def read_stream(stream: BinaryIO, what: str = "standard input", limit: int = MAX_USERDATA) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise DatasourceError(f"{what}: more than {limit} bytes (the user-data limit)")
    return data


def _optional(path: Path, what: str, limit: int) -> bytes | None:
    """A file a source may or may not have: None when absent, read_file's errors when it is there but bad."""
    if not os.path.exists(path):  # a dangling link counts as absent, as before
        return None
    return read_file(path, what, limit)


def from_file(s: Settings) -> Fetched | None:
    if s.file:
        return Fetched(f"file ({s.file})", read_file(s.file))
    for p in DEFAULT_FILES:
        data = _optional(Path(p), "user-data file", MAX_USERDATA)
        if data is not None:
            return Fetched(f"file ({p})", data)
    return None


IGNITION_URL_KEYS = ("ignition.config.url", "flatcar.config.url", "coreos.config.url")


def cmdline_url(text: str) -> str | None:
    """The user-data URL on the kernel command line: Ignition's `ignition.config.url=` (or Flatcar's
    older `flatcar.config.url=` / `coreos.config.url=`), else `cloud-config-url=` (or with
    underscores). The last one of a kind wins; an Ignition URL wins over a cloud-config one, as on
    Flatcar cloud-config is not applied on top of Ignition anyway."""
    found: dict[bool, str] = {}
    for tok in text.split():
        key, eq, value = tok.partition("=")
        if eq and key in IGNITION_URL_KEYS:
            found[True] = value
        elif eq and key.replace("_", "-") == "cloud-config-url":
            found[False] = value
    return found.get(True) or found.get(False)


def from_url(s: Settings) -> Fetched | None:
    raw = _optional(s.cmdline, "kernel command line", MAX_CMDLINE)
    if raw is None:
        return None
    url = cmdline_url(raw.decode("utf-8", "replace"))
    if not url:
        return None
    try:
        data = http_get(url, s, limit=MAX_USERDATA)
    except _NotFound:
        data = b""  # coreos-cloudinit: 4xx = empty user-data, not an error
    return Fetched(f"url ({url})", data)


def _label_dirs(s: Settings, labels: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Devices with one of these labels, mounted read-only into a temporary directory (live host only)."""
    out = []
    for label in labels:
        dev = s.by_label / label
        if dev.exists():
            out.append((label, dev))
    return out


def _mounted(dev: Path, probe: Callable[[Path], Fetched | None]) -> Fetched | None:
    """Read a labelled volume: FAT (the usual config-2/CIDATA) with mtools, needing no mount; others mounted ro."""
    from obelisk.tools import ToolError, run

    tmp = Path(tempfile.mkdtemp(prefix="obelisk-cloudconfig-"))
    try:
        try:
            run(["mcopy", "-s", "-n", "-i", dev, "::/", f"{tmp}/"], timeout=60, env={"MTOOLS_SKIP_CHECK": "1"})
            got = probe(tmp)
            if got is not None:
                got.source = got.source.replace(str(tmp), str(dev))
            return got
        except ToolError:
            pass  # not FAT (iso9660, ext4...): mount it
        mnt = tmp / "mnt"
        mnt.mkdir()
        try:
            run(["mount", "-o", "ro", dev, mnt], timeout=30)
        except ToolError as exc:
            raise DatasourceError(f"cannot read {dev}: {exc}") from None
        try:
            got = probe(mnt)
            if got is not None:
                got.source = got.source.replace(str(mnt), str(dev))
            return got
        finally:
            run(["umount", mnt], check=False, timeout=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_configdrive(d: Path) -> Fetched | None:
    latest = d / "openstack" / "latest"
    if not latest.is_dir():
        return None
    md = Metadata()
    try:
        meta = json.loads(_optional(latest / "meta_data.json", "meta_data.json", MAX_METADATA) or b"{}")
    except ValueError:
        meta = {}
    if isinstance(meta, dict):
        md.hostname = meta.get("hostname") if isinstance(meta.get("hostname"), str) else None
        keys = meta.get("public_keys")
        if isinstance(keys, dict):
            md.public_keys = [str(v).strip() for _, v in sorted(keys.items()) if isinstance(v, str)]
        md.instance_id = meta.get("uuid") if isinstance(meta.get("uuid"), str) else None
    data = _optional(latest / "user_data", "user_data file", MAX_USERDATA) or b""
    return Fetched(f"configdrive ({d})", data, md)


def _probe_volumes(s: Settings, dirs: tuple[str, ...], labels: tuple[str, ...], read: Callable[[Path], Fetched | None]
                   ) -> Fetched | None:
    """The first of the given directories, then of the volumes with the given labels, that ``read`` accepts."""
    for d in dirs:
        got = read(Path(d))
        if got:
            return got
    for _label, dev in _label_dirs(s, labels):
        got = _mounted(dev, read)
        if got:
            return got
    return None


def from_configdrive(s: Settings) -> Fetched | None:
    return _probe_volumes(s, s.configdrive_dirs, s.configdrive_labels, read_configdrive)


def read_nocloud(d: Path) -> Fetched | None:
    if not (d / "meta-data").is_file() and not (d / "user-data").is_file():
        return None
    md = Metadata()
    try:
        meta = yaml.safe_load(_optional(d / "meta-data", "meta-data file", MAX_METADATA) or b"")
    except (yaml.YAMLError, ValueError, RecursionError):
        meta = None
    if isinstance(meta, dict):
        host = meta.get("local-hostname") or meta.get("hostname")
        md.hostname = str(host) if isinstance(host, str) else None
        md.instance_id = str(meta.get("instance-id")) if meta.get("instance-id") is not None else None
        keys = meta.get("public-keys") or meta.get("public_keys")
        if isinstance(keys, str):
            md.public_keys = [keys]
        elif isinstance(keys, list):
            md.public_keys = [str(k) for k in keys if isinstance(k, str)]
        elif isinstance(keys, dict):
            md.public_keys = [str(v) for _, v in sorted(keys.items()) if isinstance(v, str)]
    data = _optional(d / "user-data", "user-data file", MAX_USERDATA) or b""
    return Fetched(f"nocloud ({d})", data, md)


def from_nocloud(s: Settings) -> Fetched | None:
    return _probe_volumes(s, s.nocloud_dirs, s.nocloud_labels, read_nocloud)


def _imds_token(s: Settings, base: str) -> str | None:
    """IMDSv2 session token; None when the service only speaks IMDSv1 (PUT refused with 4xx)."""
    try:
        raw = http_get(f"{base}/latest/api/token", s, method="PUT",
                       headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, limit=4096)
    except _NotFound:
        return None
    token = raw.decode("ascii", "replace").strip()
    if not token or not token.isprintable() or any(c.isspace() for c in token) or "\ufffd" in token:
        # it goes back into a header: anything else would be refused by requests or split the header
        raise DatasourceError(f"{base}: the IMDSv2 token is not a printable ASCII word; is this EC2 metadata?")
    return token


def from_ec2(s: Settings) -> Fetched | None:
    base = s.ec2_endpoint.rstrip("/")
    try:
        token = _imds_token(s, base)
    except Unreachable:
        return None  # nothing answers: not on EC2
    headers = {"X-aws-ec2-metadata-token": token} if token else {}

    def get(path: str) -> str | None:
        try:
            return http_get(f"{base}/latest/{path}", s, headers=headers).decode("utf-8", "replace").strip()
        except _NotFound:
            return None

    iid = get("meta-data/instance-id")
    if iid is None:
        return None
    md = Metadata(instance_id=iid, hostname=get("meta-data/local-hostname") or get("meta-data/hostname"),
                  private_ipv4=get("meta-data/local-ipv4"), public_ipv4=get("meta-data/public-ipv4"),
                  private_ipv6=(get("meta-data/ipv6") or "").split("\n")[0] or None)
    keys = get("meta-data/public-keys/") or ""
    listed = [ln.split("=", 1)[0].strip() for ln in keys.splitlines()]
    listed = [idx for idx in listed if idx.isdigit()]
    if len(listed) > MAX_KEYS:  # each is fetched and kept: a listing of 100 000 would be 100 000 requests
        raise DatasourceError(f"{base}: the metadata lists {len(listed)} public keys; at most {MAX_KEYS} are read")
    for idx in listed:
        k = get(f"meta-data/public-keys/{idx}/openssh-key")
        if k:
            md.public_keys.append(k)
    try:
        data = http_get(f"{base}/latest/user-data", s, headers=headers, limit=MAX_USERDATA)
    except _NotFound:
        data = b""
    return Fetched(f"ec2 ({base}, {'IMDSv2' if token else 'IMDSv1'})", data, md)


PROBES: dict[str, Callable[[Settings], Fetched | None]] = {
    "file": from_file, "url": from_url, "configdrive": from_configdrive, "nocloud": from_nocloud, "ec2": from_ec2,
}


def fetch(s: Settings, name: str | None = None) -> Fetched | None:
    """The named source, or the first source in ORDER that has user-data; None when none has."""
    if name is not None:
        if name not in PROBES:
            raise DatasourceError(f"unknown datasource {name!r}: use one of {', '.join(ORDER)}")
        got = PROBES[name](s)
        if got is None:
            raise DatasourceError(f"datasource {name} has no user-data on this host")
        return got
    if s.file is not None:
        return from_file(s)
    for n in ORDER:
        got = PROBES[n](s)
        if got is not None:
            s.log(f"using datasource {got.source}")
            return got
    return None


def environment_addresses(env: dict[str, str] | None = None) -> dict[str, str]:
    """$private_ipv4 & co. from COREOS_PRIVATE_IPV4 (coreos-cloudinit's names) or OBELISK_PRIVATE_IPV4."""
    env = dict(os.environ) if env is None else env
    out = {}
    for k in ("private_ipv4", "public_ipv4", "private_ipv6", "public_ipv6"):
        v = env.get(f"OBELISK_{k.upper()}") or env.get(f"COREOS_{k.upper()}")
        if v:
            out[k] = v
    return out
