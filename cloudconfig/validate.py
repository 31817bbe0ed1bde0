"""Validate user-data: header rules, YAML syntax, keys, types and values, with line numbers.

Line numbers come from the YAML node marks of PyYAML's composer (not from scanning the text, which
is how coreos-cloudinit guessed them), so every entry points at the key or value it is about.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cloudconfig import schema
from cloudconfig.schema import Field
from obelisk.errors import ObeliskError

MAX_USERDATA = 16 * 1024 * 1024
# write_files content after base64/gzip: per file, and all files together (apply holds them in its plan).
MAX_FILE = 16 * 1024 * 1024
MAX_FILES_TOTAL = 64 * 1024 * 1024
# YAML aliases (*a) let a small document stand for a huge tree: at most this many nodes are walked.
MIN_NODE_BUDGET = 100_000
HEADER = "#cloud-config"
SUBST_VARS = ("private_ipv4", "public_ipv4", "private_ipv6", "public_ipv6")
# Values used when validating without a datasource, so URLs built from $private_ipv4 still check.
PLACEHOLDERS = {"private_ipv4": "192.0.2.10", "public_ipv4": "198.51.100.10",
                "private_ipv6": "fd00::10", "public_ipv6": "2001:db8::10"}
_SUBST_RE = re.compile(r"(\\?)\$(" + "|".join(SUBST_VARS) + r")\b")
_TAG = "tag:yaml.org,2002:"
_MULTILINE = {"content"}
# Keys people put at the wrong level, and where they belong.
_MISPLACED = {"units": "under coreos:", "etcd2": "under coreos:", "etcd": "under coreos:", "update": "under coreos:",
              "locksmith": "under coreos:", "write_files": "at the top level, not under coreos:",
              "users": "at the top level", "hostname": "at the top level", "ssh_authorized_keys": "at the top level"}


@dataclass
class Entry:
    line: int
    column: int
    level: str  # "error" | "warning"
    path: str
    message: str

    def text(self) -> str:
        return f"line {self.line}: {self.level}: {self.message}"


class Binary(bytes):
    """Content given as YAML !!binary: already bytes, never re-decoded as text."""


@dataclass
class Report:
    kind: str  # "cloud-config" | "script" | "ignition" | "empty" | "invalid"
    entries: list[Entry] = field(default_factory=list)
    value: dict[str, Any] | None = None  # normalized cloud-config (underscored keys, known keys only)
    text: str = ""  # user-data after decompression and substitution

    @property
    def errors(self) -> list[Entry]:
        return [e for e in self.entries if e.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.entries]

    def add(self, line: int, column: int, level: str, path: str, message: str) -> None:
        # a key written as "\ud800" is a lone surrogate: printable only when escaped
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        self.entries.append(Entry(line, column, level, path, message))


class DecompressedTooLarge(ObeliskError, ValueError):
    """Data that would decompress to more than the limit; nothing past the limit was produced."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


_GZIP_MAGIC = b"\x1f\x8b"
_INFLATE_STEP = 1024 * 1024  # output produced per call: memory stays near the limit, never past it


def gunzip(data: bytes, limit: int) -> bytes:
    """gzip (one or several members, as gzip.decompress) with at most ``limit`` bytes of output.

    Raises DecompressedTooLarge past the limit and ValueError for data that is not gzip or is cut short.
    """
    out = bytearray()
    rest = data
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        buf = rest
        try:
            while not d.eof:
                chunk = d.decompress(buf, min(_INFLATE_STEP, limit + 1 - len(out)))
                buf = d.unconsumed_tail
                if not chunk and not buf:
                    raise ValueError("the gzip data is cut short")
                out += chunk
                if len(out) > limit:
                    raise DecompressedTooLarge(limit)
        except zlib.error as exc:
            raise ValueError(f"not gzip data ({exc})") from None
        rest = d.unused_data
        if not rest:
            return bytes(out)
        if rest[:2] != _GZIP_MAGIC:
            raise ValueError("not gzip data (garbage after the end of the stream)")


def _line_of_offset(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode_userdata(raw: bytes) -> tuple[str | None, Report | None]:
    """Bytes -> text (gunzipped when it starts with the gzip magic), or a report saying why not."""
    if len(raw) > MAX_USERDATA:
        rep = Report("invalid")
        rep.add(1, 1, "error", "", f"user-data is more than {MAX_USERDATA} bytes (the limit)")
        return None, rep
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gunzip(raw, MAX_USERDATA)
        except DecompressedTooLarge:
            rep = Report("invalid")
            rep.add(1, 1, "error", "", f"decompressed user-data exceeds {MAX_USERDATA} bytes")
            return None, rep
        except ValueError as exc:
            rep = Report("invalid")
            rep.add(1, 1, "error", "", f"user-data starts like gzip but does not decompress ({exc})")
            return None, rep
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        rep = Report("invalid")
        rep.add(_line_of_offset(raw, exc.start), 1, "error", "",
                f"user-data is not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8")
        return None, rep


def classify(text: str) -> str:
    """coreos-cloudinit's header rules."""
    if not text.strip():
        return "empty"
    first = text.split("\n", 1)[0].rstrip()
    if first == HEADER:
        return "cloud-config"
    if first.startswith("#!"):
        return "script"
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            doc = json.loads(stripped)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and ("ignitionVersion" in doc or isinstance(doc.get("ignition"), dict)):
            return "ignition"
    return "invalid"


def used_variables(text: str) -> set[str]:
    return {m.group(2) for m in _SUBST_RE.finditer(text) if not m.group(1)}


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace $private_ipv4 & co. textually (before YAML parsing); \\$name stays a literal $name."""
    def repl(m: re.Match[str]) -> str:
        return "$" + m.group(2) if m.group(1) else values.get(m.group(2), "")
    return _SUBST_RE.sub(repl, text)


# --- the structural walk ----------------------------------------------------------------------

def _pos(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + "null"


def _want(spec: Field) -> str:
    return {"str": "string", "bool": "bool (true/false)", "int": "integer", "list": "list", "map": "map"}[spec.kind]


class _Expanded(Exception):
    """The document names more nodes than its size allows: an alias bomb."""


class _Walker:
    def __init__(self, report: Report, budget: int) -> None:
        self.r = report
        self.marks: dict[str, tuple[int, int]] = {}  # path -> (line, column) of the value
        self.budget = budget  # nodes left to walk; aliases walk the same node again

    def err(self, node: Node, path: str, msg: str, level: str = "error") -> None:
        line, col = _pos(node)
        self.r.add(line, col, level, path, msg)

    def walk(self, node: Node, spec: Field, path: str, key: Node | None = None) -> Any:
        """The checked value of ``node``; type errors go on the line of its ``key`` (coreos-cloudinit's line)."""
        self.budget -= 1
        if self.budget < 0:
            raise _Expanded
        self.marks[path] = _pos(node)
        at = key or node
        name = path.rsplit(".", 1)[-1] if path else "cloud-config"
        if spec.kind == "any":
            return None
        if spec.kind == "map":
            if not isinstance(node, MappingNode):
                self.err(at, path, f'incorrect type for "{name}" (want map)')
                return None
            return self._map(node, spec, path)
        if spec.kind == "list":
            if not isinstance(node, SequenceNode):
                self.err(at, path, f'incorrect type for "{name}" (want list)')
                return None
            out = []
            for i, item in enumerate(node.value):
                if _is_null(item):
                    self.err(item, f"{path}[{i}]", f'empty item in "{name}"', "warning")
                    continue
                v = self.walk(item, spec.item, f"{path}[{i}]")  # type: ignore[arg-type]
                if v is not None:
                    out.append(v)
            return out
        if not isinstance(node, ScalarNode):
            self.err(at, path, f'incorrect type for "{name}" (want {_want(spec)})')
            return None
        value: Any
        if spec.kind == "bool":
            if node.tag != _TAG + "bool":
                self.err(at, path, f'incorrect type for "{name}" (want bool (true/false), got {node.value!r})')
                return None
            value = node.value.lower() in ("yes", "true", "on", "y")
        elif spec.kind == "int":
            if node.tag != _TAG + "int":
                self.err(at, path, f'incorrect type for "{name}" (want integer)')
                return None
            value = int(node.value.replace("_", ""), 0) if node.value.strip("+-").isdigit() else node.value
        else:  # str: any scalar, taken as written (so 0644 stays "0644"), like coreos' lenient strings
            if node.tag == _TAG + "binary":
                try:
                    value = Binary(base64.b64decode("".join(node.value.split()), validate=True))
                except (binascii.Error, ValueError):
                    self.err(node, path, f'"{name}" is tagged !!binary but is not valid base64')
                    return None
            else:
                value = node.value
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:  # "\ud800" in a double-quoted string: no file can hold it
                    self.err(node, path, f'"{name}" is not valid text: it contains a lone surrogate (\\ud800-\\udfff)')
                    return None
                if name not in _MULTILINE:
                    # one-line settings end up in passwd, env files and unit names: a newline would forge lines
                    value = value.strip("\r\n")
                    if "\n" in value or "\r" in value or "\0" in value:
                        self.err(node, path, f'"{name}" must be a single line')
                        return None
        if spec.check is not None:
            msg = spec.check(value)
            if msg:
                self.err(node, path, msg)
                return None
        return value

    def _map(self, node: MappingNode, spec: Field, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        seen: dict[str, Node] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode) or knode.tag == _TAG + "null":
                self.err(knode, path, "keys must be plain names")
                continue
            raw = knode.value
            key = raw.replace("-", "_")
            kpath = f"{path}.{key}" if path else key
            if key in seen:
                self.err(knode, kpath, f'duplicate key "{raw}" (first at line {_pos(seen[key])[0]}); the last one wins',
                         "warning")
            seen[key] = knode
            sub = spec.fields.get(key)
            if sub is None:
                self.err(knode, kpath, self._unknown(raw, key, spec, path), "warning")
                continue
            if sub.deprecated:
                self.err(knode, kpath, sub.deprecated, "warning")
            if _is_null(vnode):
                if sub.required:
                    self.err(vnode, kpath, f'"{raw}" needs a value')
                continue
            v = self.walk(vnode, sub, kpath, knode)
            if v is not None:
                out[key] = v
            else:
                out.pop(key, None)
        for key, sub in spec.fields.items():
            if sub.required and key not in seen:
                self.err(node, f"{path}.{key}" if path else key, f'missing required key "{key}"')
        return out

    @staticmethod
    def _unknown(raw: str, key: str, spec: Field, path: str) -> str:
        msg = f'unrecognized key "{raw}"'
        if key in _MISPLACED and key not in spec.fields:
            return f"{msg}: {key} belongs {_MISPLACED[key]}"
        close = difflib.get_close_matches(key, list(spec.fields), n=1, cutoff=0.75)
        return f'{msg} (did you mean "{close[0]}"?)' if close else msg


def _compose(text: str) -> Node | None:
    """libyaml when present (about 20 times faster; the provisioning server validates each rendered
    config), the pure-Python parser for text libyaml refuses: its error messages are the ones users
    read, with the line of the key to fix."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.compose(text, Loader=fast)
        except (yaml.YAMLError, RecursionError):
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def validate_text(text: str) -> Report:
    """Validate already-decoded cloud-config text (header included, substitution done)."""
    report = Report("cloud-config", text=text)
    try:
        node = _compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # "while scanning a simple key": the key's own line is the one to fix, not where the scanner gave up
        if exc.context_mark and exc.context and "simple key" in exc.context:
            mark = exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        msg = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            where = ""
            if exc.context_mark and exc.context_mark.line + 1 != line:
                where = f" started at line {exc.context_mark.line + 1}"
            msg = f"{exc.problem} ({exc.context}{where})"
        report.add(line, col, "error", "", f"YAML syntax error: {msg}")
        return report
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        report.add(line, 1, "error", "", f"YAML syntax error: unacceptable character #x{exc.character:04x}"
                   if isinstance(exc.character, int) else f"YAML syntax error: {exc.reason}")
        return report
    except yaml.YAMLError as exc:
        report.add(1, 1, "error", "", f"YAML syntax error: {exc}")
        return report
    except RecursionError:
        report.add(1, 1, "error", "", "YAML is nested too deeply")
        return report
    if node is None or _is_null(node):
        report.value = {}
        return report
    budget = max(MIN_NODE_BUDGET, len(text))
    w = _Walker(report, budget)
    if not isinstance(node, MappingNode):
        line, col = _pos(node)
        report.add(line, col, "error", "", "a cloud-config must be a map of keys (hostname:, users:, coreos:, ...)")
        return report
    try:
        value = w.walk(node, schema.ROOT, "")
    except _Expanded:
        report.entries = [e for e in report.entries if e.level == "error"][:20]
        report.add(1, 1, "error", "", f"the config expands to more than {budget} "
                   "values through YAML aliases (*name); write the values out or use fewer aliases")
        report.value = {}
        return report
    report.value = value if isinstance(value, dict) else {}
    _cross_checks(report, report.value, w.marks)
    report.entries.sort(key=lambda e: (e.line, e.column))
    return report


def validate_bytes(raw: bytes, values: dict[str, str] | None = None) -> Report:
    """The whole pipeline for one user-data blob; ``values`` substitute $private_ipv4 & co."""
    text, bad = decode_userdata(raw)
    if bad is not None:
        return bad
    assert text is not None
    kind = classify(text)
    if kind != "cloud-config":
        rep = Report(kind, text=text)
        if kind == "invalid":
            rep.add(1, 1, "error", "", 'the first line must be "#cloud-config" or begin with "#!" (a script)')
        return rep
    return validate_text(substitute(text, values if values is not None else PLACEHOLDERS))


# --- checks that need more than one key -----------------------------------------------------------

def decode_content(content: str | bytes, encoding: str | None) -> bytes:
    """write_files content -> bytes (at most MAX_FILE); raises ValueError naming what failed."""
    if isinstance(content, bytes):
        data = bytes(content)
        if encoding in (None, "b64", "base64"):
            return data
    else:
        data = content.encode()
    enc = encoding or ""
    if enc in ("b64", "base64", "gz+b64", "gz+base64", "gzip+b64", "gzip+base64"):
        try:
            data = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"content cannot be decoded as {enc}: not valid base64") from exc
    if enc.startswith("gz"):
        try:
            data = gunzip(data, MAX_FILE)
        except DecompressedTooLarge:
            raise ValueError(f"content cannot be decoded as {enc}: it exceeds {MAX_FILE} bytes when decompressed "
                             "(the limit per file)") from None
        except ValueError as exc:
            raise ValueError(f"content cannot be decoded as {enc}: not gzip data") from exc
    elif len(data) > MAX_FILE:
        raise ValueError(f"content is {len(data)} bytes; the limit per file is {MAX_FILE} bytes")
    return data


_KEY_FILES = (("etcd2", "key_file"), ("etcd2", "peer_key_file"), ("etcd", "key_file"), ("etcd", "peer_key_file"),
              ("locksmith", "etcd_keyfile"))


def _cross_checks(rep: Report, cfg: dict[str, Any], marks: dict[str, tuple[int, int]]) -> None:
    def at(path: str, level: str, msg: str) -> None:
        line, col = marks.get(path, (1, 1))
        rep.add(line, col, level, path, msg)

    files = cfg.get("write_files", [])
    by_path: dict[str, int] = {}
    total = 0
    for i, wf in enumerate(files):
        p = f"write_files[{i}]"
        if "content" in wf and total <= MAX_FILES_TOTAL:
            try:
                total += len(decode_content(wf["content"], wf.get("encoding")))
            except ValueError as exc:
                at(f"{p}.content", "error", str(exc))
            if total > MAX_FILES_TOTAL:
                at(f"{p}.content", "error", f"write_files decode to more than {MAX_FILES_TOTAL} bytes by this entry "
                   f"({total} bytes so far); the limit for all files together is {MAX_FILES_TOTAL} bytes")
        if wf.get("path") in by_path:
            at(f"{p}.path", "warning", f"{wf['path']} is also written by write_files[{by_path[wf['path']]}]; "
               "the last one wins")
        if "path" in wf:
            by_path[wf["path"]] = i
    coreos = cfg.get("coreos", {})
    for sect, key in _KEY_FILES:
        kp = coreos.get(sect, {}).get(key)
        if kp in by_path:
            i = by_path[kp]
            perm = files[i].get("permissions")
            if perm is not None and int(str(perm), 8) & 0o077:
                at(f"write_files[{i}].permissions", "warning",
                   f"{kp} is a private key (coreos.{sect}.{key}) but permissions {perm} let others read it; use 0600")
    if "etcd" in coreos and "etcd2" in coreos:
        at("coreos.etcd", "error", "use only one of coreos.etcd and coreos.etcd2")
    for sect in ("etcd2", "etcd"):
        e = coreos.get(sect)
        if not e:
            continue
        ways = [k for k in ("initial_cluster", "discovery", "discovery_srv") if k in e]
        if len(ways) > 1:
            at(f"coreos.{sect}.{ways[1]}", "error",
               f"set only one of initial_cluster, discovery, discovery_srv (found {', '.join(ways)})")
        if "initial_cluster" in e and e.get("proxy", "off") == "off":
            members = dict(p.strip().split("=", 1) for p in e["initial_cluster"].split(",") if "=" in p)
            name = e.get("name")
            if name is None:
                at(f"coreos.{sect}.initial_cluster", "warning",
                   "name is not set: etcd will use the host name, which must be listed in initial_cluster")
            elif name not in members:
                at(f"coreos.{sect}.name", "error", f'member "{name}" is not listed in initial_cluster; add '
                   f"{name}=<its peer URL> or fix the name")
            elif "initial_advertise_peer_urls" in e:
                adv = {u.strip() for u in e["initial_advertise_peer_urls"].split(",")}
                listed = {u.strip() for u in members[name].split(",")}
                if not adv & listed:
                    at(f"coreos.{sect}.initial_advertise_peer_urls", "error",
                       f'initial_advertise_peer_urls does not match "{name}" in initial_cluster ({members[name]})')
        if e.get("proxy") in ("on", "readonly") and not ways:
            at(f"coreos.{sect}.proxy", "error", "a proxy needs initial_cluster, discovery or discovery_srv to find "
               "the members")
    from cloudconfig.bootstrap import check_settings
    from cloudconfig.model import CloudConfig

    partial = CloudConfig(update={k: str(x) for k, x in coreos.get("update", {}).items()},
                          locksmith={k: str(x) for k, x in coreos.get("locksmith", {}).items()})
    for path, msg in check_settings(partial):
        if not any(e.path == path for e in rep.entries):
            at(path, "error", msg)
    lk = coreos.get("locksmith", {})
    if ("window_start" in lk) != ("window_length" in lk):
        missing = "window_length" if "window_start" in lk else "window_start"
        at(f"coreos.locksmith.{'window_start' if 'window_start' in lk else 'window_length'}", "error",
           f"a reboot window needs both window_start and window_length; add {missing}")
    for i, unit in enumerate(coreos.get("units", [])):
        p = f"coreos.units[{i}]"
        if unit.get("mask") and "content" in unit:
            at(f"{p}.content", "warning", f"{unit.get('name', 'this unit')} is masked, so its content is not written")
        if (not any(k in unit for k in ("content", "enable", "command", "mask", "drop_ins")) and "name" in unit
                and not any(e.path.startswith(p) for e in rep.entries)):
            at(p, "warning", f"unit {unit['name']} has no content, enable, command, mask or drop_ins: nothing to do")
        names = [d.get("name") for d in unit.get("drop_ins", [])]
        for j, n in enumerate(names):
            if n is not None and n in names[:j]:
                at(f"{p}.drop_ins[{j}].name", "warning", f"drop-in {n} is listed twice; the last one wins")
