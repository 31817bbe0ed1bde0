"""Recognise, read and validate one Ignition or Butane config into a report (no fetching, no writing)."""

from __future__ import annotations

import os
import re
from typing import Any

from cloudconfig.ignition import butane
from cloudconfig.ignition.reader import Doc, ReadError, join, read_json, read_yaml, through
from cloudconfig.ignition.report import IgnitionReport
from cloudconfig.ignition.spec import SCHEMA, SPECS, Checker, Walker
from cloudconfig.validate import decode_userdata

_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")
_JSON_IGNITION = re.compile(r'"ignition(?:Version)?"\s*:')
_BUTANE = re.compile(r"^(?:variant|version)[ \t]*:", re.M)
NOT_A_CONFIG = ("not an Ignition config (JSON with ignition.version) nor a Butane config (YAML with variant: "
                "and version:)")


def detect_text(text: str) -> str | None:
    head = text.lstrip()
    if head.startswith("{"):
        return "ignition" if _JSON_IGNITION.search(text) else None
    first = head.split("\n", 1)[0].rstrip()
    if first.startswith(("#cloud-config", "#!")):
        return None
    return "butane" if _BUTANE.search(text) else None


def detect(raw: bytes) -> str | None:
    """"ignition" for Ignition JSON, "butane" for Butane YAML, None for anything else (cloud-config...)."""
    text, bad = decode_userdata(raw)
    return None if bad is not None or text is None else detect_text(text)


class _Sink:
    """Collects entries at pointers as written, positioned through the document's marks. A check
    after the walk is not repeated where the walk already found an error (a value of the wrong type
    is also a missing value)."""

    def __init__(self, report: IgnitionReport, doc: Doc | None) -> None:
        self.r = report
        self.doc = doc
        self.walked: set[str] = set()

    def at(self, src: str, level: str, message: str, key: bool = False) -> None:
        line, col = self.doc.where(src, key=key) if self.doc else (1, 1)
        self.r.add(line, col, level, src, message)
        if level == "error":
            self.walked.add(src)

    def check(self, src: str, level: str, message: str) -> None:
        if src not in self.walked:
            line, col = self.doc.where(src) if self.doc else (1, 1)
            self.r.add(line, col, level, src, message)


def read(raw: bytes, *, files_dir: str | os.PathLike[str] | None = None, butane_ok: bool = True) -> IgnitionReport:
    """Validate ``raw``; ``report.value`` is the config in Ignition's JSON shape when there are no errors."""
    text, bad = decode_userdata(raw)
    if bad is not None or text is None:
        rep = IgnitionReport("invalid")
        for e in bad.entries if bad else []:
            rep.add(e.line, e.column, e.level, "", e.message.replace("user-data", "config"))
        return rep
    kind = detect_text(text)
    if kind == "butane" and butane_ok:
        return read_butane(text, files_dir)
    if kind == "ignition" or text.lstrip().startswith("{"):
        return read_ignition(text)
    rep = IgnitionReport("invalid", text=text)
    rep.add(1, 1, "error", "", NOT_A_CONFIG if butane_ok else "not an Ignition config (JSON with ignition.version)")
    return rep


def read_ignition(text: str) -> IgnitionReport:
    rep = IgnitionReport("ignition", text=text)
    try:
        doc = read_json(text)
    except ReadError as exc:
        rep.add(exc.line, exc.column, "error", "", exc.message)
        return rep
    sink = _Sink(rep, doc)
    top = doc.value
    if not isinstance(top, dict):
        sink.at("", "error", "an Ignition config must be a JSON object ({\"ignition\": {\"version\": ...}})")
        return rep
    version = _version(top, sink)
    if version is None:
        rep.sort()
        return rep
    rep.version = rep.spec = version
    for kptr, line, col, first in doc.duplicates:
        rep.add(line, col, "warning", kptr, f'duplicate key "{kptr.rsplit("/", 1)[-1]}" (first at line {first}); '
                "the last one wins")
    w = Walker(sink.at, SPECS[version])
    value = w.walk(top, SCHEMA, "", "", "config") or {}

    def norm(ptr: str, level: str, message: str) -> None:
        sink.check(through(w.tmap, ptr), level, message)

    Checker(norm, SPECS[version]).run(value)
    rep.sort()
    if rep.ok:
        value.setdefault("ignition", {})["version"] = version
        rep.value = value
    return rep


def _version(top: dict[str, Any], sink: _Sink) -> str | None:
    if "ignitionVersion" in top:
        sink.at("/ignitionVersion", "error", "Ignition spec 1 configs (ignitionVersion) are not supported: obelisk "
                "reads spec 3.0.0 to 3.4.0; rewrite the config in Butane or spec 3", key=True)
        return None
    ign = top.get("ignition")
    ver = ign.get("version") if isinstance(ign, dict) else None
    if ver is None:
        sink.at("/ignition/version" if isinstance(ign, dict) else "", "error",
                'ignition.version is required (for example "ignition": {"version": "3.4.0"})')
        return None
    if not isinstance(ver, str):
        sink.at("/ignition/version", "error", "ignition.version must be a string such as \"3.4.0\"")
        return None
    m = _SEMVER.fullmatch(ver)
    if not m:
        sink.at("/ignition/version", "error", f"invalid config version {ver[:40]!r} (couldn't parse)")
        return None
    if ver in SPECS:
        return ver
    major = int(m.group(1))
    if major < 3:
        why = (f"Ignition spec {major} configs (version {ver}) are not supported: obelisk reads spec 3.0.0 to "
               "3.4.0; translate it to spec 3 (ign-converter) or rewrite it in Butane")
    else:
        why = f"unsupported config version {ver}: obelisk reads Ignition spec 3.0.0 to 3.4.0"
    sink.at("/ignition/version", "error", why)
    return None


def read_butane(text: str, files_dir: str | os.PathLike[str] | None) -> IgnitionReport:
    rep = IgnitionReport("butane", text=text)
    try:
        doc = read_yaml(text)
    except ReadError as exc:
        rep.add(exc.line, exc.column, "error", "", exc.message)
        return rep
    sink = _Sink(rep, doc)
    top = doc.value
    if not isinstance(top, dict):
        sink.at("", "error", "a Butane config must be a YAML mapping (variant:, version:, ...)")
        return rep
    variant, version, problem, spec = butane.header(top)
    rep.variant, rep.version = variant, version
    if problem or spec is None:
        sink.at("/variant" if not variant else "/version", "error", problem or "unsupported")
        return rep
    rep.spec = f"{spec[0]}.{spec[1]}.0"
    body = {k: v for k, v in top.items() if k not in ("variant", "version")}
    for key, (since, why) in butane.FCOS_ONLY.items():
        if key in body and variant == "fcos" and version is not None and version >= since \
                and body.pop(key) is not None:
            sink.at(join("", key), "error", why)
    w = Walker(lambda src, lvl, msg, key: sink.at(src, lvl, msg, key), spec, spell=butane.snake,
               since=butane.since_text(variant), loose_case=False)
    value = w.walk(body, butane.BUTANE_SCHEMA, "", "", "config") or {}

    def at_butane(bptr: str, level: str, message: str) -> None:
        sink.at(through(w.tmap, bptr, butane.snake), level, message)

    tr = butane.Translator(spec, files_dir, at_butane)
    ign = tr.run(value)

    def at_ignition(iptr: str, level: str, message: str) -> None:
        sink.check(through(w.tmap, through(tr.tmap, iptr), butane.snake), level, message)

    Checker(at_ignition, spec, butane=True).run(ign)
    rep.sort()
    if rep.ok:
        rep.value = ign
    return rep
