"""Omaha v3 codec as Flatcar's update_engine speaks it (client requests, server responses).

The client (`update_engine.daemon`) and the server (`update_server`) both import this module, so
the two can never drift apart, and a Nebraska server can drive obelisk hosts: the request carries
the same attributes Flatcar sends (appid, version, track = group, bootid, machineid, board, ...),
the response is read the way Flatcar's `OmahaRequestAction::ParseResponse` reads it
(first package only, postinstall action `sha256` in base64 is the payload hash, `PollInterval`).
Parsing never trusts its input: size-capped, parsed by defusedxml with DTDs, entities and external
references refused (whatever the document's encoding or where the declaration sits), and every
failure is an OmahaError. A response may only point the host at http(s) URLs (the daemon runs as
root: a ``file:`` or bare-path codebase would make it open a local file and tell the server by its
error code whether that file exists).
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from xml.sax.saxutils import quoteattr

import defusedxml
import defusedxml.ElementTree as DET

from obelisk.errors import ObeliskError
from obelisk.versions import (
    compare_versions,  # noqa: F401  (re-exported for older callers)
    is_version,
)

# Never "CoreOSUpdateEngine-0.1.0.0" with installsource=scheduler: Nebraska takes that pair for its syncer.
UPDATER_VERSION = "obelisk-update_engine-0.1.0"
OS_VERSION = "Chateau"
OS_PLATFORM = "CoreOS"  # what Flatcar sends; Nebraska keys nothing on it
MAX_XML = 1 << 20
MAX_URLS = 16  # codebases one response may list (each is tried with retries: thousands would stall the host)
MAX_URL = 2048  # characters of one codebase + package name
MAX_VERSION = 128  # characters of the offered version
MAX_POLL_INTERVAL = 24 * 3600  # a larger PollInterval is cut to this (a year would stop updates for good)

# Event types and results (Omaha; the ones Flatcar and Nebraska use).
EVENT_UPDATE_COMPLETE = 3
EVENT_DOWNLOAD_STARTED = 13
EVENT_DOWNLOAD_FINISHED = 14
RESULT_ERROR = 0
RESULT_SUCCESS = 1
RESULT_SUCCESS_REBOOT = 2
RESULT_DEFERRED = 9

# Error codes (Flatcar's ActionExitCode values worth reusing).
ERR_OK = 0
ERR_POSTINSTALL = 5
ERR_DOWNLOAD_TRANSFER = 9
ERR_PAYLOAD_HASH = 10
ERR_PAYLOAD_SIZE = 11
ERR_PAYLOAD_VERIFICATION = 12
ERR_NEW_ROOTFS_VERIFICATION = 14
ERR_SIGNATURE = 18
ERR_OMAHA_INVALID = 34
ERR_HTTP = 37
ERR_DEFERRED_BACKOFF = 40
ERR_ROLLBACK = 44
ERR_OMAHA_HTTP_BASE = 2000
FLAG_RESUMED = 1 << 30


class OmahaError(ObeliskError, ValueError):
    """A request or response cannot be used; ``code`` is the Omaha error code to report."""

    def __init__(self, message: str, code: int = ERR_OMAHA_INVALID) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Event:
    type: int
    result: int
    errorcode: int | None = None
    previousversion: str | None = None
    # obelisk's addition: the host's own words for an error or a rollback (Nebraska ignores the attribute).
    # Not part of an event's identity: two events of one type, result and code are the same event.
    reason: str | None = field(default=None, compare=False)

    def xml(self) -> str:
        attrs = f'eventtype="{self.type}" eventresult="{self.result}"'
        if self.errorcode is not None:
            attrs += f' errorcode="{self.errorcode}"'
        if self.previousversion is not None:
            attrs += f" previousversion={quoteattr(self.previousversion)}"
        if self.reason:
            attrs += f" reason={quoteattr(self.reason)}"
        return f"        <event {attrs}></event>\n"


@dataclass
class AppRequest:
    appid: str
    version: str
    track: str
    machineid: str = ""
    bootid: str = ""
    board: str = "amd64-usr"
    oem: str = ""
    oemversion: str = ""
    alephversion: str = ""
    machinealias: str = ""
    lang: str = "en-US"
    hardware_class: str = ""
    delta_okay: bool = False
    ping: bool = False
    updatecheck: bool = False
    events: list[Event] = field(default_factory=list)


@dataclass
class Request:
    app: AppRequest
    installsource: str = "scheduler"  # or "ondemandupdate"
    version: str = UPDATER_VERSION
    os_version: str = OS_VERSION
    os_platform: str = OS_PLATFORM
    os_sp: str = ""
    os_arch: str = ""


def board_for(arch: str) -> str:
    """Flatcar's board names; Nebraska derives the arch from them."""
    return {"amd64": "amd64-usr", "x86_64": "amd64-usr", "arm64": "arm64-usr", "aarch64": "arm64-usr"}.get(
        arch, f"{arch}-usr")


def arch_of_board(board: str) -> str:
    return {"amd64-usr": "amd64", "arm64-usr": "arm64"}.get(board, board.removesuffix("-usr"))


def build_request(req: Request) -> bytes:
    """The request XML, attribute for attribute and in the order Flatcar's GetRequestXml writes it."""
    a = req.app
    body = ""
    if a.ping:
        body += '        <ping active="1"></ping>\n'
    if a.updatecheck:
        body += "        <updatecheck></updatecheck>\n"
    body += "".join(e.xml() for e in a.events)
    attrs = [("appid", a.appid), ("version", a.version), ("track", a.track), ("bootid", a.bootid),
             ("oem", a.oem), ("oemversion", a.oemversion), ("alephversion", a.alephversion),
             ("machineid", a.machineid), ("machinealias", a.machinealias), ("lang", a.lang),
             ("board", a.board), ("hardware_class", a.hardware_class),
             ("delta_okay", "true" if a.delta_okay else "false")]
    app_attrs = " ".join(f"{k}={quoteattr(v)}" for k, v in attrs)
    os_attrs = f"version={quoteattr(req.os_version)} platform={quoteattr(req.os_platform)} sp={quoteattr(req.os_sp)}"
    if req.os_arch:
        os_attrs += f" arch={quoteattr(req.os_arch)}"
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<request protocol="3.0" version={quoteattr(req.version)} updaterversion={quoteattr(req.version)} '
        f'installsource={quoteattr(req.installsource)} ismachine="1">\n'
        f"    <os {os_attrs}></os>\n"
        f"    <app {app_attrs} >\n{body}    </app>\n"
        "</request>\n"
    )
    return xml.encode()


# ---------------------------------------------------------------- safe parsing


def _parse_xml(data: bytes, what: str) -> ET.Element:
    if not isinstance(data, bytes | bytearray):
        raise OmahaError(f"{what} is not bytes")
    if len(data) > MAX_XML:
        raise OmahaError(f"{what} is larger than {MAX_XML} bytes")
    if not data.strip():
        raise OmahaError(f"{what} is empty")
    # The parser refuses the declarations themselves (expat reports them in any encoding, anywhere in the
    # document), so no entity is ever expanded: a byte scan missed UTF-16 and a DOCTYPE after 4 KiB.
    try:
        return DET.fromstring(bytes(data), forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException:
        raise OmahaError(f"{what} declares a DTD or entities, which Omaha never uses") from None
    except (ET.ParseError, ValueError, LookupError, RecursionError) as exc:  # LookupError: unknown encoding
        raise OmahaError(f"{what} is not well-formed XML: {str(exc)[:200]}") from None


def _int(s: str | None, what: str, *, default: int | None = None) -> int:
    if s is None or s == "":
        if default is not None:
            return default
        raise OmahaError(f"{what} is missing")
    if not re.fullmatch(r"-?\d{1,19}", s.strip()):
        raise OmahaError(f"{what} is not an integer: {s[:40]!r}")
    return int(s)


def parse_request(data: bytes) -> Request:
    """Server side: the request's first app, its ping/updatecheck and events."""
    root = _parse_xml(data, "Omaha request")
    if root.tag != "request":
        raise OmahaError(f"Omaha request root is <{root.tag[:40]}>, expected <request>")
    if root.get("protocol") != "3.0":
        raise OmahaError(f"Omaha protocol {root.get('protocol')!r} is not supported (3.0 is)")
    app_el = root.find("app")
    if app_el is None:
        raise OmahaError("Omaha request has no <app>")
    os_el = root.find("os")
    events = []
    for ev in app_el.findall("event"):
        events.append(Event(
            _int(ev.get("eventtype"), "event eventtype"), _int(ev.get("eventresult"), "event eventresult"),
            _int(ev.get("errorcode"), "event errorcode") if ev.get("errorcode") is not None else None,
            ev.get("previousversion"), ev.get("reason")))
    g = app_el.get
    app = AppRequest(
        appid=g("appid") or "", version=g("version") or "", track=g("track") or "",
        machineid=g("machineid") or "", bootid=g("bootid") or "", board=g("board") or "", oem=g("oem") or "",
        oemversion=g("oemversion") or "", alephversion=g("alephversion") or "",
        machinealias=g("machinealias") or "", lang=g("lang") or "", hardware_class=g("hardware_class") or "",
        delta_okay=g("delta_okay") == "true", ping=app_el.find("ping") is not None,
        updatecheck=app_el.find("updatecheck") is not None, events=events)
    if not app.appid:
        raise OmahaError("Omaha request <app> has no appid")
    return Request(app=app, installsource=root.get("installsource") or "", version=root.get("version") or "",
                   os_version=os_el.get("version", "") if os_el is not None else "",
                   os_platform=os_el.get("platform", "") if os_el is not None else "",
                   os_sp=os_el.get("sp", "") if os_el is not None else "",
                   os_arch=os_el.get("arch", "") if os_el is not None else "")


# ---------------------------------------------------------------- response


@dataclass
class Update:
    """What an `ok` updatecheck offers (Flatcar reads exactly these)."""

    version: str
    urls: list[str]  # codebase + package name
    package_name: str
    size: int
    sha256: str  # hex, from the postinstall action's base64 `sha256`
    sha1_b64: str = ""
    is_delta: bool = False
    disable_payload_backoff: bool = False
    max_failure_count_per_url: int = 10


@dataclass
class Response:
    app_status: str = "ok"
    status: str = "noupdate"  # updatecheck status
    poll_interval: int = 0
    update: Update | None = None
    events_acked: int = 0


def build_response(appid: str, *, app_status: str = "ok", updatecheck: str | None = "noupdate",
                   update: Update | None = None, codebase: str = "", events: int = 0, ping: bool = False,
                   poll_interval: int | None = None, server: str = "obelisk") -> bytes:
    """Response XML in the shape Nebraska sends (one app, one package, one postinstall action)."""
    parts = [f"    <app appid={quoteattr(appid)} status={quoteattr(app_status)}>\n"]
    if ping:
        parts.append('        <ping status="ok"></ping>\n')
    parts += ['        <event status="ok"></event>\n'] * events
    if updatecheck is not None:
        poll = f' PollInterval="{poll_interval}"' if poll_interval else ""
        if update is None:
            parts.append(f"        <updatecheck status={quoteattr(updatecheck)}{poll}></updatecheck>\n")
        else:
            sha_b64 = base64.b64encode(bytes.fromhex(update.sha256)).decode()
            parts.append(
                f'        <updatecheck status="ok"{poll}>\n'
                f"            <urls><url codebase={quoteattr(codebase)}></url></urls>\n"
                f"            <manifest version={quoteattr(update.version)}>\n"
                f"                <packages><package name={quoteattr(update.package_name)} "
                f"hash={quoteattr(update.sha1_b64)} size=\"{update.size}\" required=\"true\" "
                f"hash_sha256={quoteattr(update.sha256)}></package></packages>\n"
                f'                <actions><action event="postinstall" sha256={quoteattr(sha_b64)} '
                f"DisplayVersion={quoteattr(update.version)} "
                f'IsDeltaPayload="{"true" if update.is_delta else "false"}" '
                f'DisablePayloadBackoff="{"true" if update.disable_payload_backoff else "false"}" '
                f"needsadmin=\"false\"></action></actions>\n"
                "            </manifest>\n"
                "        </updatecheck>\n")
    parts.append("    </app>\n")
    xml = ('<?xml version="1.0" encoding="UTF-8"?>\n'
           f'<response protocol="3.0" server={quoteattr(server)}>\n'
           '    <daystart elapsed_seconds="0"></daystart>\n' + "".join(parts) + "</response>\n")
    return xml.encode()


def parse_response(data: bytes) -> Response:
    """Client side, following Flatcar's ParseResponse order; any problem is OmahaError(34)."""
    root = _parse_xml(data, "Omaha response")
    if root.tag != "response":
        raise OmahaError(f"Omaha response root is <{root.tag[:40]}>, expected <response>")
    app = root.find("app")
    if app is None:
        raise OmahaError("Omaha response has no <app>")
    out = Response(app_status=app.get("status", "ok"), events_acked=len(app.findall("event")))
    uc = app.find("updatecheck")
    if out.app_status != "ok":
        # Nebraska says why in the app status (error-unknownApplication, error-noPackageFound, ...).
        detail = (uc.get("status") or "")[:80] if uc is not None else ""
        raise OmahaError(f"update server refused the app: {out.app_status[:80]}" + (f" ({detail})" if detail else ""))
    if uc is None:
        raise OmahaError("Omaha response has no <updatecheck>")
    try:
        out.poll_interval = min(max(0, int(uc.get("PollInterval") or 0)), MAX_POLL_INTERVAL)
    except ValueError:
        out.poll_interval = 0  # Flatcar ignores a bad PollInterval rather than failing the check
    status = uc.get("status")
    if status is None:
        raise OmahaError("Omaha response <updatecheck> has no status")
    out.status = status
    if status == "noupdate":
        return out
    if status != "ok":
        raise OmahaError(f"update server answered updatecheck status {status[:60]!r}")
    manifest = uc.find("manifest")
    if manifest is None:
        raise OmahaError("Omaha response has no <manifest>")
    urls = [u.get("codebase", "") for u in uc.findall("urls/url")]
    if not urls or any(not u for u in urls):
        raise OmahaError("Omaha response has no url codebase")
    if len(urls) > MAX_URLS:
        raise OmahaError(f"Omaha response lists {len(urls)} urls; at most {MAX_URLS} are accepted")
    pkg = manifest.find("packages/package")
    if pkg is None:
        raise OmahaError("Omaha response has no <package>")
    name = pkg.get("name", "")
    if not name:
        raise OmahaError("Omaha response package has an empty name")
    _check_package_name(name)
    for u in urls:
        check_payload_url(u)
    version = manifest.get("version", "")
    if version and (len(version) > MAX_VERSION or not is_version(version)):
        raise OmahaError(f"Omaha response manifest version is not a version: {version[:40]!r}")
    size = _int(pkg.get("size"), "package size", default=0)
    if size <= 0:
        raise OmahaError(f"Omaha response has an invalid payload size: {pkg.get('size')!r}")
    action = next((a for a in manifest.findall("actions/action") if a.get("event") == "postinstall"), None)
    if action is None:
        raise OmahaError("Omaha response has no postinstall action")
    sha_b64 = action.get("sha256", "")
    try:
        sha = base64.b64decode(sha_b64, validate=True)
    except (binascii.Error, ValueError):
        sha = b""
    if len(sha) != 32:
        raise OmahaError("Omaha response postinstall sha256 is not a base64 SHA-256")
    try:
        max_fail = int(action.get("MaxFailureCountPerUrl") or 10)
    except ValueError:
        max_fail = 10
    out.update = Update(
        version=version,
        urls=[u + ("" if u.endswith("/") else "/") + name for u in urls],
        package_name=name, size=size, sha256=sha.hex(), sha1_b64=pkg.get("hash", ""),
        is_delta=action.get("IsDeltaPayload") == "true",
        disable_payload_backoff=action.get("DisablePayloadBackoff") == "true",
        max_failure_count_per_url=max_fail)
    return out


_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def check_payload_url(url: str) -> str:
    """``url`` when it is an absolute http(s) URL without credentials; else OmahaError.

    What an Omaha answer may send the host to. Anything else (``file:``, a bare path, ``ftp:``) is
    refused before it is opened, so the error the host reports says nothing about its own files."""
    if len(url) > MAX_URL:
        raise OmahaError(f"Omaha response url is longer than {MAX_URL} characters")
    if _CONTROL.search(url):
        raise OmahaError(f"Omaha response url has spaces or control characters: {url[:60]!r}")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise OmahaError(f"Omaha response url is malformed: {url[:60]!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise OmahaError(f"Omaha response url {url[:60]!r} is not an http(s):// URL: only those are fetched")
    if parts.username is not None or parts.password is not None:
        raise OmahaError("Omaha response url carries credentials (user@host): refused")
    return url


def _check_package_name(name: str) -> None:
    if len(name) > 255 or name in (".", "..") or "/" in name or "\\" in name or _CONTROL.search(name):
        raise OmahaError(f"Omaha response package name is not a plain file name: {name[:60]!r}")
