"""The Ignition config specs 3.0.0 to 3.4.0: schema, the structural walk, and the spec's checks.

One schema covers all five versions: every field says in which version it appeared, so a 3.0.0
config that uses ``kernelArguments`` is told the field is not part of its spec. The walk checks
types (as Go's encoding/json does: a wrong type is fatal, null is "not set") and yields the config
in the 3.4.0 shape, the shape merge and apply work on (Ignition translates every config to its
newest spec the same way). The checks after the walk are the ones in coreos/ignition
config/v3_*/types, with obelisk's refusals added (no partitioning, no kernel arguments, only
data:/http(s) sources, nothing under the read-only /usr, nothing that could forge passwd lines).

The schema also carries what merge needs: whether a scalar is a Go pointer (a child's unset
pointer keeps the parent's value), the key of each list's entries, lists whose entries share one
key space (files, directories and links by path), and lists that are appended instead of merged.
"""

from __future__ import annotations

import difflib
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloudconfig.ignition.fetch import HASHES, DataURLError, gunzip, hash_problem, parse_data_url
from cloudconfig.ignition.reader import Raw, join, yaml_int

Version = tuple[int, int]
SPECS: dict[str, Version] = {"3.0.0": (3, 0), "3.1.0": (3, 1), "3.2.0": (3, 2), "3.3.0": (3, 3), "3.4.0": (3, 4)}
LATEST = "3.4.0"
INT64 = 2 ** 63
MAX_ID = 2 ** 32 - 2  # uid_t/gid_t; (uid_t)-1 means "unchanged" to chown
UNIT_TYPES = (".service", ".socket", ".device", ".mount", ".automount", ".swap", ".target", ".path", ".timer",
              ".snapshot", ".slice", ".scope")
UNIT_LINE_MAX = 2048  # go-systemd's SYSTEMD_LINE_MAX
NO_PARTITIONING = ("obelisk does not partition disks or create filesystems at provisioning time "
                   "(the disk layout is part of the image); remove this section")
NO_KARGS = ("obelisk's kernel command line is part of the signed image's boot entries and is not changed at "
            "provisioning time; build the image with these arguments instead")
NO_GRUB = ("obelisk's GRUB configuration (users included) is part of the signed image and is not changed at "
           "provisioning time; remove this section")

Add = Callable[[str, str, str], None]  # (pointer in the normalized config, level, message)


@dataclass(frozen=True)
class T:
    kind: str  # "str" | "int" | "bool" | "obj" | "list"
    fields: dict[str, F] = field(default_factory=dict)
    item: T | None = None
    key: Callable[[Any], str] | None = None  # list entries' merge/duplicate key; None for scalar entries
    handles: dict[str, str] = field(default_factory=dict)  # list fields that share one key space


@dataclass(frozen=True)
class F:
    t: T
    since: Version = (3, 0)
    ptr: bool = True  # a Go pointer (or a list/struct): unset in a child keeps the parent's value
    ignore_dups: bool = False  # entries are appended on merge, never deduplicated
    sugar: bool = False  # Butane only (inline, local, trees, ...)


STR, INT, BOOL = T("str"), T("int"), T("bool")


def _by(name: str) -> Callable[[Any], str]:
    return lambda d: str(d.get(name) or "") if isinstance(d, dict) else ""


def _partition_key(p: Any) -> str:
    if not isinstance(p, dict):
        return ""
    if p.get("number"):
        return f"number:{p['number']}"
    return f"label:{p['label']}" if p.get("label") is not None else ""


def _obj(**fields: F) -> T:
    return T("obj", fields=fields)


def _list(item: T, key: Callable[[Any], str] | None = None) -> T:
    return T("list", item=item, key=key)


def _resource(compression_since: Version, butane: bool) -> T:
    f = {"compression": F(STR, compression_since), "httpHeaders": F(_list(_obj(
        name=F(STR, ptr=False), value=F(STR)), _by("name")), (3, 1)),
        "source": F(STR), "verification": F(_obj(hash=F(STR)))}
    if butane:  # Butane 0.1 (fcos 1.0.0) has inline only for file contents; local came with 0.2
        f["inline"] = F(STR, compression_since, sugar=True)
        f["local"] = F(STR, (3, 1), sugar=True)
    return T("obj", fields=f)


def _node(**extra: F) -> T:
    owner = _obj(id=F(INT), name=F(STR))
    return T("obj", fields={"group": F(owner), "overwrite": F(BOOL), "path": F(STR, ptr=False), "user": F(owner),
                            **extra})


def build(butane: bool = False) -> T:
    """The schema; with ``butane`` the sugar fields Butane adds (read by butane.py)."""
    file_res = _resource((3, 0), butane)
    cfg_res = _resource((3, 1), butane)
    sources = _by("source")
    unit_extra = {"contents_local": F(STR, (3, 4), sugar=True)} if butane else {}
    user_extra = {"ssh_authorized_keys_local": F(_list(STR), (3, 4), sugar=True)} if butane else {}
    fs_extra = {"with_mount_unit": F(BOOL, (3, 1), sugar=True)} if butane else {}
    storage_extra = {"trees": F(_list(_obj(local=F(STR), path=F(STR))), (3, 1), sugar=True)} if butane else {}
    tang = _obj(advertisement=F(STR, (3, 4)), thumbprint=F(STR), url=F(STR, ptr=False))
    clevis = _obj(custom=F(_obj(config=F(STR), needsNetwork=F(BOOL), pin=F(STR))),
                  tang=F(_list(tang, _by("url"))), threshold=F(INT), tpm2=F(BOOL))
    partition = _obj(guid=F(STR), label=F(STR), number=F(INT, ptr=False), resize=F(BOOL, (3, 2)),
                     shouldExist=F(BOOL), sizeMiB=F(INT), startMiB=F(INT), typeGuid=F(STR),
                     wipePartitionEntry=F(BOOL))
    storage = T("obj", fields={
        "directories": F(_list(_node(mode=F(INT)), _by("path"))),
        "disks": F(_list(_obj(device=F(STR, ptr=False), partitions=F(_list(partition, _partition_key)),
                              wipeTable=F(BOOL)), _by("device"))),
        "files": F(_list(_node(append=F(_list(file_res, sources), ignore_dups=True), contents=F(file_res),
                               mode=F(INT)), _by("path"))),
        "filesystems": F(_list(T("obj", fields={
            "device": F(STR, ptr=False), "format": F(STR), "label": F(STR),
            "mountOptions": F(_list(STR), (3, 1), ignore_dups=True), "options": F(_list(STR), ignore_dups=True),
            "path": F(STR), "uuid": F(STR), "wipeFilesystem": F(BOOL), **fs_extra}), _by("device"))),
        "links": F(_list(_node(hard=F(BOOL), target=F(STR)), _by("path"))),
        "luks": F(_list(_obj(clevis=F(clevis), device=F(STR), discard=F(BOOL, (3, 4)), keyFile=F(file_res),
                             label=F(STR), name=F(STR, ptr=False), openOptions=F(_list(STR), (3, 4)),
                             options=F(_list(STR), ignore_dups=True), uuid=F(STR), wipeVolume=F(BOOL)),
                        _by("name")), (3, 2)),
        "raid": F(_list(_obj(devices=F(_list(STR)), level=F(STR), name=F(STR, ptr=False),
                             options=F(_list(STR), ignore_dups=True), spares=F(INT)), _by("name"))),
        **storage_extra,
    }, handles={"directories": "node", "files": "node", "links": "node"})
    dropin = T("obj", fields={"contents": F(STR), "name": F(STR, ptr=False),
                              **({"contents_local": F(STR, (3, 4), sugar=True)} if butane else {})})
    unit = T("obj", fields={"contents": F(STR), "dropins": F(_list(dropin, _by("name"))), "enabled": F(BOOL),
                            "mask": F(BOOL), "name": F(STR, ptr=False), **unit_extra})
    user = T("obj", fields={
        "gecos": F(STR), "groups": F(_list(STR)), "homeDir": F(STR), "name": F(STR, ptr=False),
        "noCreateHome": F(BOOL), "noLogInit": F(BOOL), "noUserGroup": F(BOOL), "passwordHash": F(STR),
        "primaryGroup": F(STR), "sshAuthorizedKeys": F(_list(STR)), "shell": F(STR),
        "shouldExist": F(BOOL, (3, 2)), "system": F(BOOL), "uid": F(INT), **user_extra})
    group = _obj(gid=F(INT), name=F(STR, ptr=False), passwordHash=F(STR), shouldExist=F(BOOL, (3, 2)),
                 system=F(BOOL))
    ignition_fields = {
        "config": F(_obj(merge=F(_list(cfg_res, sources)), replace=F(cfg_res))),
        "proxy": F(_obj(httpProxy=F(STR), httpsProxy=F(STR), noProxy=F(_list(STR))), (3, 1)),
        "security": F(_obj(tls=F(_obj(certificateAuthorities=F(_list(cfg_res, sources)))))),
        "timeouts": F(_obj(httpResponseHeaders=F(INT), httpTotal=F(INT))),
    }
    if not butane:  # Butane's version is its own top-level field
        ignition_fields["version"] = F(STR, ptr=False)
    return _obj(
        ignition=F(T("obj", fields=ignition_fields)),
        kernelArguments=F(T("obj", fields={"shouldExist": F(_list(STR)), "shouldNotExist": F(_list(STR))},
                            handles={"shouldExist": "karg", "shouldNotExist": "karg"}), (3, 3)),
        passwd=F(_obj(groups=F(_list(group, _by("name"))), users=F(_list(user, _by("name"))))),
        storage=F(storage),
        systemd=F(_obj(units=F(_list(unit, _by("name"))))),
    )


SCHEMA = build()


def vtext(v: Version) -> str:
    return f"{v[0]}.{v[1]}.0"


# --- the structural walk --------------------------------------------------------------------------

_ZERO: dict[str, Any] = {"obj": {}, "list": [], "str": "", "int": 0, "bool": False}
_WANT = {"str": "a string", "int": "an integer", "bool": "a boolean (true/false)", "obj": "an object",
         "list": "a list"}


def _got(v: Any) -> str:
    if isinstance(v, Raw):
        return {"str": "a string", "int": "an integer", "bool": "a boolean", "float": "a number"}.get(v.tag, v.tag)
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    return {str: "a string", dict: "an object", list: "a list"}.get(type(v), type(v).__name__)


class Walker:
    """Type-checks a read document against the schema, producing the normalized config.

    ``spell`` turns a schema name into the key the input uses (identity for JSON, snake_case for
    Butane); ``since`` words a version for messages. ``tmap`` maps normalized pointers to the
    pointers as written, so later checks can be reported where the user wrote the value.
    """

    def __init__(self, add: Callable[[str, str, str, bool], None], version: Version, *,
                 spell: Callable[[str], str] = lambda n: n, since: Callable[[Version], str] | None = None,
                 loose_case: bool = True) -> None:
        self.add = add  # (pointer as written, level, message, at_key)
        self.v = version
        self.spell = spell
        self.since = since or (lambda v: f"spec {vtext(v)}")
        self.loose_case = loose_case
        self.tmap: dict[str, str] = {}

    def walk(self, value: Any, t: T, src: str, out: str, name: str) -> Any:
        self.tmap[out] = src
        if t.kind == "obj":
            if not isinstance(value, dict):
                self.add(src, "error", f'"{name}" must be {_WANT["obj"]}, not {_got(value)}', False)
                return None
            return self._obj(value, t, src, out)
        if t.kind == "list":
            if not isinstance(value, list):
                self.add(src, "error", f'"{name}" must be {_WANT["list"]}, not {_got(value)}', False)
                return None
            items = []
            for i, item in enumerate(value):
                ipath = join(src, i)
                assert t.item is not None
                if item is None:  # Go decodes null into the zero value
                    item = _ZERO[t.item.kind]
                v = self.walk(item, t.item, ipath, join(out, len(items)), f"{name}[{i}]")
                if v is not None:
                    items.append(v)
            return items
        return self._scalar(value, t.kind, src, name)

    def _scalar(self, value: Any, kind: str, src: str, name: str) -> Any:
        if isinstance(value, Raw):
            return self._raw(value, kind, src, name)
        ok = (isinstance(value, str) if kind == "str" else isinstance(value, bool) if kind == "bool"
              else isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            hint = ""
            if name == "mode" and isinstance(value, str):
                hint = " (write the mode as a decimal number: 0644 is 420, 0755 is 493)"
            elif kind == "int" and isinstance(value, float) and value.is_integer():
                hint = " (write it without a decimal point)"
            self.add(src, "error", f'"{name}" must be {_WANT[kind]}, not {_got(value)}'
                     f"{' (' + repr(value)[:40] + ')' if not isinstance(value, dict | list) else ''}{hint}", False)
            return None
        if kind == "int" and not -INT64 <= value < INT64:
            self.add(src, "error", f'"{name}" {value} is out of range', False)
            return None
        return value

    def _raw(self, value: Raw, kind: str, src: str, name: str) -> Any:
        if kind == "str":
            return value.text
        if kind == "bool" and value.tag == "bool":
            return value.text.lower() in ("true", "yes", "on", "y")
        if kind == "int" and (value.tag == "int" or (value.tag == "str" and not value.quoted)):
            n = yaml_int(value.text)
            if n is not None and -INT64 <= n < INT64:
                return n
        if value.tag == kind:  # a YAML integer obelisk does not read, such as 1:30 (YAML 1.1 sexagesimal)
            self.add(src, "error", f'"{name}" {value.text[:40]!r} is not an integer obelisk reads (write decimal, '
                     "0644/0o644 octal or 0x hex)", False)
        else:
            self.add(src, "error", f'"{name}" must be {_WANT[kind]}, not {_got(value)} ({value.text[:40]!r})', False)
        return None

    def _obj(self, value: dict[str, Any], t: T, src: str, out: str) -> dict[str, Any]:
        res: dict[str, Any] = {}
        spelled = {self.spell(n): n for n in t.fields}
        lower = {k.lower(): n for k, n in spelled.items()}
        for key, v in value.items():
            kpath = join(src, key)
            fname = spelled.get(key)
            if fname is None and self.loose_case and key.lower() in lower:
                # Go's encoding/json matches keys without regard to case; Ignition warns about it
                fname = lower[key.lower()]
                self.add(kpath, "warning", f'"{key}" is spelled "{self.spell(fname)}" in the spec', True)
            if fname is None:
                close = difflib.get_close_matches(key, list(spelled), n=1, cutoff=0.75)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.add(kpath, "warning", f'unrecognized key "{key}"{hint}; it is ignored', True)
                continue
            f = t.fields[fname]
            if f.since > self.v:
                self.add(kpath, "warning", f'"{key}" is not part of {self.since(self.v)} (it was added in '
                         f"{self.since(f.since)}); it is ignored", True)
                continue
            if v is None:
                continue
            w = self.walk(v, f.t, kpath, join(out, fname), key)
            if w is not None:
                res[fname] = w
        return res


# --- the checks after the walk --------------------------------------------------------------------

def clean_path(p: str) -> str:
    """Go's path.Clean."""
    if not p:
        return "."
    rooted = p.startswith("/")
    parts: list[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    out = ("/" if rooted else "") + "/".join(parts)
    return out or ("/" if rooted else ".")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LINE_UNSAFE = re.compile(r"[:\n\r\0]")


def account_name(name: str) -> str | None:
    """Why ``name`` cannot be a user or group name (it ends up as a passwd/group line), or None."""
    if not name:
        return "is empty"
    if len(name) > 32 or not _NAME.fullmatch(name) or name.isdigit() or name in (".", ".."):
        return 'is not valid: use letters, digits, "_", "-" and "." (at most 32, not all digits)'
    return None


def _decimal_mode(mode: int, directory: bool) -> bool:
    """Butane's CheckForDecimalMode: 644 written where 0644 was meant."""
    if not 0 <= mode <= 7777:
        return False
    octal = 0
    for ch in f"{mode:04d}":
        if ch > "7":
            return False
        octal = octal * 8 + int(ch)
    return not _typical(mode, directory) and _typical(octal, directory)


def _typical(mode: int, directory: bool) -> bool:
    if mode == 0:
        return True
    had_r = had_w = had_x = False
    for perm in (mode & 0o7, (mode >> 3) & 0o7, (mode >> 6) & 0o7):
        r, w, x = bool(perm & 4), bool(perm & 2), bool(perm & 1)
        if (not r and had_r) or (not w and had_w) or (not x and had_x):
            return False
        if x and had_r and not had_x:
            return False
        if (w or x) and not r:
            return False
        had_r, had_w, had_x = had_r or r, had_w or w, had_x or x
    if not had_r:
        return False
    if directory:
        return had_x and not mode & 0o4000 and not (mode & 0o3000 and not had_w)
    if mode & 0o6000 and (not had_x or mode & 2):
        return False
    return not mode & 0o1000


class Checker:
    def __init__(self, add: Add, version: Version, *, butane: bool = False) -> None:
        self.add = add
        self.v = version
        self.butane = butane

    def err(self, ptr: str, msg: str) -> None:
        self.add(ptr, "error", msg)

    def warn(self, ptr: str, msg: str) -> None:
        self.add(ptr, "warning", msg)

    def run(self, cfg: dict[str, Any]) -> None:
        self.duplicates(cfg, SCHEMA, "")
        self.ignition(cfg.get("ignition", {}))
        st = cfg.get("storage", {})
        for sect in ("disks", "raid", "filesystems", "luks"):
            if st.get(sect):
                self.err(f"/storage/{sect}", f"storage.{sect}: {NO_PARTITIONING}")
        for i, f in enumerate(st.get("files", [])):
            self.file(f, f"/storage/files/{i}")
        for i, d in enumerate(st.get("directories", [])):
            self.node(d, f"/storage/directories/{i}")
            self.mode(d.get("mode"), f"/storage/directories/{i}/mode", directory=True)
        for i, link in enumerate(st.get("links", [])):
            self.node(link, f"/storage/links/{i}")
        self.storage_relations(st)
        self.systemd(cfg.get("systemd", {}), st)
        self.passwd(cfg.get("passwd", {}))
        ka = cfg.get("kernelArguments", {})
        for k in ("shouldExist", "shouldNotExist"):
            if ka.get(k):
                self.err(f"/kernelArguments/{k}", f"kernel arguments: {NO_KARGS}")

    # -- duplicates, per list (and across lists that share a key space) --
    def duplicates(self, value: Any, t: T, ptr: str) -> None:
        if t.kind == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                self.duplicates(item, t.item, join(ptr, i))  # type: ignore[arg-type]
            return
        if t.kind != "obj" or not isinstance(value, dict):
            return
        seen: dict[tuple[str, str], str] = {}
        for name, f in t.fields.items():
            sub = value.get(name)
            if sub is None:
                continue
            self.duplicates(sub, f.t, join(ptr, name))
            if f.t.kind != "list" or f.ignore_dups:
                continue
            space = t.handles.get(name, name)
            key = f.t.key or (lambda x: str(x))
            for i, item in enumerate(sub):
                k = (space, key(item))
                here = join(join(ptr, name), i)
                if k in seen:
                    self.err(here, f"duplicate entry defined (also at {seen[k]})")
                else:
                    seen[k] = here

    # -- resources --
    def resource(self, res: dict[str, Any], ptr: str, *, required: bool, what: str) -> None:
        comp = res.get("compression")
        if comp not in (None, "", "gzip"):
            self.err(f"{ptr}/compression", f'invalid compression method "{comp}" (use "gzip" or leave it out)')
        src = res.get("source")
        h = res.get("verification", {}).get("hash")
        if h is not None:
            if src is None:
                self.err(f"{ptr}/verification/hash", "source must be specified if verification is specified")
            self.hash(h, f"{ptr}/verification/hash")
        if src is None or src == "":
            if required:
                self.err(f"{ptr}/source" if src == "" else ptr, f"{what}: source is required")
            return
        scheme = self.url(src, f"{ptr}/source", what)
        headers = res.get("httpHeaders", [])
        if headers and scheme not in ("http", "https"):
            self.err(f"{ptr}/httpHeaders", "cannot use HTTP headers with this source scheme (only http and https)")
        for i, hd in enumerate(headers):
            hp = f"{ptr}/httpHeaders/{i}"
            if not hd.get("name"):
                self.err(f"{hp}/name", "HTTP header name can't be empty")
            elif not _HEADER_NAME.fullmatch(hd["name"]):
                self.err(f"{hp}/name", f'HTTP header name "{hd["name"][:40]}" is not a valid token')
            if hd.get("value") == "":
                self.err(f"{hp}/value", "unable to parse HTTP header (an empty value; leave value out instead)")
            elif re.search(r"[\r\n\0]", hd.get("value") or ""):
                self.err(f"{hp}/value", "HTTP header value must be one line")
        if scheme == "data" and (comp == "gzip" or (h is not None and self._hash_ok(h))):
            self.data_contents(src, comp, h, ptr)

    def data_contents(self, src: str, comp: str | None, h: str | None, ptr: str) -> None:
        """A data: source is checked whole before anything is applied: gzip and hash included."""
        try:
            data = parse_data_url(src)
        except DataURLError:
            return  # already reported by url()
        if comp == "gzip":
            try:
                data = gunzip(data)
            except ValueError as exc:
                self.err(f"{ptr}/compression", f"the data: contents are {exc}")
                return
        problem = hash_problem(data, h) if h and self._hash_ok(h) else None
        if problem:
            self.err(f"{ptr}/verification/hash", f"the data: contents do not match: {problem}")

    def _hash_ok(self, h: str) -> bool:
        fn, _, hexsum = h.partition("-")
        return fn in self._hashes() and len(hexsum) == HASHES[fn] and bool(re.fullmatch(r"[0-9a-fA-F]+", hexsum))

    def _hashes(self) -> tuple[str, ...]:
        return ("sha512", "sha256") if self.v >= (3, 1) else ("sha512",)

    def hash(self, h: str, ptr: str) -> None:
        fn, sep, hexsum = h.partition("-")
        if not sep:
            self.err(ptr, f'malformed hash specifier "{h[:40]}" (write {"/".join(self._hashes())}-<hex digest>)')
        elif fn not in self._hashes():
            extra = " (sha256 needs spec 3.1.0 or later)" if fn == "sha256" else ""
            self.err(ptr, f'unrecognized hash function "{fn[:20]}"{extra}')
        elif len(hexsum) != HASHES[fn]:
            self.err(ptr, f"incorrect size for hash sum ({fn} is {HASHES[fn]} hex digits, got {len(hexsum)})")
        elif not re.fullmatch(r"[0-9a-fA-F]+", hexsum):
            self.err(ptr, "hash sum is not hexadecimal")

    def url(self, src: str, ptr: str, what: str) -> str:
        m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", src)
        scheme = m.group(1).lower() if m else ""
        later = {"gs": (3, 2), "arn": (3, 4)}
        if scheme == "data":
            try:
                parse_data_url(src)
            except DataURLError as exc:
                self.err(ptr, f"invalid data URL: it {exc}")
        elif scheme in ("http", "https"):
            try:
                parts = urllib.parse.urlsplit(src)
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                self.err(ptr, f"unable to parse url {src[:80]!r}")
                return scheme
            if not parts.hostname:
                self.err(ptr, f"unable to parse url {src[:80]!r}: no host")
            elif re.search(r"[\s\0]", src):
                self.err(ptr, "url contains white space or control characters")
        elif scheme in ("tftp", "s3") or (scheme in later and self.v >= later[scheme]):
            self.err(ptr, f"{what}: obelisk does not fetch {scheme}: sources; serve it over https "
                     "(with verification.hash) or inline it as a data: URL")
        else:
            self.err(ptr, f"invalid url scheme in {src[:60]!r}: use data:, http:// or https://")
        return scheme

    def ignition(self, ign: dict[str, Any]) -> None:
        c = ign.get("config", {})
        for i, ref in enumerate(c.get("merge", [])):
            self.resource(ref, f"/ignition/config/merge/{i}", required=True, what="config to merge")
        if c.get("replace"):
            self.resource(c["replace"], "/ignition/config/replace", required=False, what="replacement config")
            if c["replace"].get("source") is not None and c.get("merge"):
                self.warn("/ignition/config/merge", "merge is ignored because replace is set (as in Ignition)")
        for i, ca in enumerate(ign.get("security", {}).get("tls", {}).get("certificateAuthorities", [])):
            self.resource(ca, f"/ignition/security/tls/certificateAuthorities/{i}", required=True,
                          what="certificate authority")
        for k, v in ign.get("timeouts", {}).items():
            if v < 0:
                self.err(f"/ignition/timeouts/{k}", f"{k} must be 0 (no limit) or a number of seconds")
        proxy = ign.get("proxy", {})
        for k in ("httpProxy", "httpsProxy"):
            if k in proxy:
                p = proxy[k]
                scheme = urllib.parse.urlsplit(p).scheme if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", p) else ""
                if scheme not in ("http", "https"):
                    self.err(f"/ignition/proxy/{k}", "proxies must be http(s)")
                elif scheme == "http" and k == "httpsProxy":
                    self.warn(f"/ignition/proxy/{k}", "insecure plaintext HTTP proxy specified for HTTPS resources")

    # -- storage --
    def path(self, p: str, ptr: str) -> bool:
        if not p:
            self.err(ptr, "path not specified")
        elif not p.startswith("/"):
            self.err(ptr, f'path "{p[:80]}" is not absolute')
        elif "\0" in p:
            self.err(ptr, "path contains a NUL character")
        elif clean_path(p) != p:
            self.err(ptr, f'path "{p[:80]}" is not fully simplified (write "{clean_path(p)[:80]}")')
        elif p == "/":
            self.err(ptr, "path / is the root directory itself")
        elif p == "/usr" or p.startswith("/usr/"):
            self.err(ptr, f"{p[:80]} is on /usr, the signed read-only image: obelisk cannot write it at "
                     "provisioning time (use /etc, /opt or /var)")
        else:
            return True
        return False

    def owner(self, o: dict[str, Any], ptr: str) -> None:
        if o.get("id") is not None and o.get("name"):
            self.err(ptr, "cannot set both id and name")
        if o.get("id") is not None and not 0 <= o["id"] <= MAX_ID:
            self.err(f"{ptr}/id", f"id {o['id']} is out of range (0 to {MAX_ID})")
        if o.get("name"):
            why = account_name(o["name"])
            if why:
                self.err(f"{ptr}/name", f'name "{o["name"][:40]}" {why}')

    def node(self, n: dict[str, Any], ptr: str) -> None:
        self.path(n.get("path", ""), f"{ptr}/path")
        for k in ("user", "group"):
            if k in n:
                self.owner(n[k], f"{ptr}/{k}")

    def mode(self, m: int | None, ptr: str, *, directory: bool) -> None:
        if m is None:
            return
        if not 0 <= m <= 0o7777:
            self.err(ptr, f"illegal file mode {m} (modes are decimal in JSON: 0644 is 420, 0755 is 493)")
            return
        decimal = _decimal_mode(m, directory)
        if decimal:
            if self.butane:
                self.warn(ptr, "unreasonable mode would be reasonable if specified in octal; remember to add a "
                          f"leading zero (0{m:03d})")
            else:
                self.warn(ptr, f"mode {m} looks like octal {m:04d} written as decimal; in JSON write "
                          f"{int(str(m), 8)} for 0{m:03d}")
        if m & 0o7000 and not decimal:
            self.warn(ptr, "setuid/setgid/sticky bits are not supported or functional in spec versions older than "
                      f"3.6.0; mode {m:04o} is applied as {m & 0o777:04o} (as Ignition does)")

    def file(self, f: dict[str, Any], ptr: str) -> None:
        self.node(f, ptr)
        self.mode(f.get("mode"), f"{ptr}/mode", directory=False)
        contents = f.get("contents", {})
        self.resource(contents, f"{ptr}/contents", required=False, what="file contents")
        if f.get("overwrite") and contents.get("source") is None:
            self.err(f"{ptr}/overwrite", "overwrite must be false if source is unspecified")
        for j, frag in enumerate(f.get("append", [])):
            self.resource(frag, f"{ptr}/append/{j}", required=False, what="appended fragment")

    def storage_relations(self, st: dict[str, Any]) -> None:
        links = st.get("links", [])
        lpaths = [(link.get("path", ""), i) for i, link in enumerate(links)]
        for sect, msg in (("directories", "directory path includes link in config"),
                          ("files", "file path includes link in config"),
                          ("links", "link path includes link in config")):
            for i, n in enumerate(st.get(sect, [])):
                p = n.get("path", "")
                for lp, j in lpaths:
                    if lp and p.startswith(lp + "/"):
                        self.err(f"/storage/{sect}/{i}", f"{msg} (/storage/links/{j} makes {lp} a link)")
        dirs = {d.get("path") for d in st.get("directories", [])}
        for i, link in enumerate(links):
            ptr = f"/storage/links/{i}"
            target = link.get("target")
            if not target:
                self.err(f"{ptr}/target", "link target is required")
                continue
            if "\0" in target:
                self.err(f"{ptr}/target", "link target contains a NUL character")
            if not link.get("hard"):
                continue
            t = clean_path(target if target.startswith("/") else f"{link.get('path', '')}/{target}")
            if t in dirs:
                self.err(ptr, "hard link target is a directory")
            for k in ("user", "group"):
                for sub in ("id", "name"):
                    if link.get(k, {}).get(sub) is not None:
                        self.warn(f"{ptr}/{k}/{sub}", "user/group ignored for hard link")

    # -- systemd --
    def systemd(self, sd: dict[str, Any], st: dict[str, Any]) -> None:
        units = sd.get("units", [])
        by_name = {u.get("name"): u for u in units}
        written: set[str] = set()
        for i, u in enumerate(units):
            ptr = f"/systemd/units/{i}"
            name = u.get("name", "")
            self.unit_name(name, f"{ptr}/name")
            contents = u.get("contents")
            sections = self.unit_contents(contents, f"{ptr}/contents")
            if u.get("enabled") and contents and sections is not None and "Install" not in sections:
                self.warn(f"{ptr}/contents", f'unit "{name}" is enabled, but has no install section so enable does '
                          "nothing")
            if contents:
                written.add(f"/etc/systemd/system/{name}")
            for j, d in enumerate(u.get("dropins", [])):
                dp = f"{ptr}/dropins/{j}"
                dname = d.get("name", "")
                if not dname.endswith(".conf") or len(dname) <= 5:
                    self.err(f"{dp}/name", f'drop-in name "{dname[:60]}" must end in ".conf"')
                elif "/" in dname or re.search(r"[\0\n\r]", dname):
                    self.err(f"{dp}/name", f'drop-in name "{dname[:60]}" must be a file name (no "/")')
                self.unit_contents(d.get("contents"), f"{dp}/contents")
                if d.get("contents"):
                    written.add(f"/etc/systemd/system/{name}.d/{dname}")
            m = re.fullmatch(r"(.+?)@(.+?)\.service", name)
            if m and u.get("enabled"):
                tmpl = by_name.get(f"{m.group(1)}@.service")
                if tmpl and tmpl.get("contents"):
                    secs = _unit_sections(tmpl["contents"])
                    if secs is not None and "Install" not in secs:
                        self.warn(f"{ptr}/contents", f'template unit "{m.group(1)}@.service" for "{name}" doesn\'t '
                                  "have Install section")
        for sect in ("files", "directories", "links"):
            for i, n in enumerate(st.get(sect, [])):
                if n.get("path") in written:
                    self.err(f"/storage/{sect}/{i}/path", "path conflicts with systemd unit or dropin")

    def unit_name(self, name: str, ptr: str) -> None:
        if not name:
            self.err(ptr, "unit name is required")
        elif "/" in name or re.search(r"[\0\n\r\s]", name) or name.startswith("."):
            self.err(ptr, f'unit name "{name[:60]}" must be a plain file name (no "/", no white space)')
        elif not name.endswith(UNIT_TYPES) or name in UNIT_TYPES:
            self.err(ptr, f'invalid systemd unit extension: "{name[:60]}" must end in a unit type (.service, '
                     ".socket, .timer, .target, .mount, ...)")

    def unit_contents(self, contents: str | None, ptr: str) -> set[str] | None:
        if contents is None:
            return set()
        try:
            return parse_unit(contents)
        except ValueError as exc:
            self.err(ptr, f"invalid unit content: {exc}")
            return None

    # -- passwd --
    def passwd(self, pw: dict[str, Any]) -> None:
        for i, g in enumerate(pw.get("groups", [])):
            ptr = f"/passwd/groups/{i}"
            why = account_name(g.get("name", ""))
            if why:
                self.err(f"{ptr}/name", f'group name "{g.get("name", "")[:40]}" {why}')
            if g.get("gid") is not None and not 0 <= g["gid"] <= MAX_ID:
                self.err(f"{ptr}/gid", f"gid {g['gid']} is out of range (0 to {MAX_ID})")
            if _LINE_UNSAFE.search(g.get("passwordHash") or ""):
                self.err(f"{ptr}/passwordHash", 'passwordHash cannot contain ":" or a line break')
        for i, u in enumerate(pw.get("users", [])):
            self.user(u, f"/passwd/users/{i}")

    def user(self, u: dict[str, Any], ptr: str) -> None:
        why = account_name(u.get("name", ""))
        if why:
            self.err(f"{ptr}/name", f'user name "{u.get("name", "")[:40]}" {why}')
        if u.get("uid") is not None and not 0 <= u["uid"] <= MAX_ID:
            self.err(f"{ptr}/uid", f"uid {u['uid']} is out of range (0 to {MAX_ID})")
        for k in ("passwordHash", "gecos", "shell"):
            if _LINE_UNSAFE.search(u.get(k) or ""):
                self.err(f"{ptr}/{k}", f'{k} cannot contain ":" or a line break (it is a field of a passwd line)')
        if "homeDir" in u:
            if _LINE_UNSAFE.search(u["homeDir"]):
                self.err(f"{ptr}/homeDir", 'homeDir cannot contain ":" or a line break')
            elif not u["homeDir"].startswith("/") or clean_path(u["homeDir"]) != u["homeDir"]:
                self.err(f"{ptr}/homeDir", f'homeDir "{u["homeDir"][:60]}" must be an absolute, simplified path')
            elif u["homeDir"] == "/usr" or u["homeDir"].startswith("/usr/"):
                self.err(f"{ptr}/homeDir", "homeDir cannot be on /usr, the signed read-only image")
        for k in ("primaryGroup",):
            if k in u and account_name(u[k]):
                self.err(f"{ptr}/{k}", f'group name "{u[k][:40]}" {account_name(u[k])}')
        for j, g in enumerate(u.get("groups", [])):
            if account_name(g):
                self.err(f"{ptr}/groups/{j}", f'group name "{g[:40]}" {account_name(g)}')
        for j, key in enumerate(u.get("sshAuthorizedKeys", [])):
            if "\0" in key:
                self.err(f"{ptr}/sshAuthorizedKeys/{j}", "SSH key contains a NUL character")


def _unit_sections(contents: str) -> set[str] | None:
    try:
        return parse_unit(contents)
    except ValueError:
        return None


def parse_unit(text: str) -> set[str]:
    """The section names of a unit file; ValueError for what go-systemd's deserializer refuses."""
    sections: set[str] = set()
    in_section = False
    continued = False  # a value or comment continued with a trailing backslash
    lines = text.split("\n")
    for n, raw in enumerate(lines, 1):
        if len(raw.encode()) >= UNIT_LINE_MAX:
            raise ValueError(f"line {n} is too long (max {UNIT_LINE_MAX} bytes)")
        line = raw.rstrip("\r")
        if continued:
            continued = line.rstrip(" ").endswith("\\")
            continue
        s = line.strip()
        if not s:
            continue
        if s[0] in "#;":
            continued = line.rstrip(" ").endswith("\\")
            continue
        if s.startswith("["):
            end = s.find("]")
            if end < 0:
                raise ValueError(f"line {n}: unable to find end of section")
            if s[end + 1:].strip():
                raise ValueError(f"line {n}: found garbage after section name {s[1:end]}: {s[end + 1:].strip()!r}")
            sections.add(s[1:end])
            in_section = True
            continue
        if not in_section:
            continue  # go-systemd skips anything before the first section
        if "=" not in line:
            if n == len(lines):
                raise ValueError(f"line {n}: unexpected end of file while parsing option name {s[:40]!r}")
            raise ValueError(f"line {n}: unexpected newline encountered while parsing option name {s[:40]!r}")
        continued = line.endswith("\\")
    return sections
