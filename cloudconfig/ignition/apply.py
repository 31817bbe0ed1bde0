"""Provision a root from an Ignition/Butane config: render, fetch, plan every change, commit once.

The order is Ignition's files stage: groups and users, then storage (directories, files and
symbolic links from the shallowest path down, hard links last), then systemd units, then the
result file. Before the first write: the config and every config it merges or is replaced by
are fetched and validated, every file's contents and fragments are fetched, decompressed and
verified, and every change is planned (cloudconfig.rootfs.Plan). Any failure up to there changes
nothing. Paths are resolved inside the root: a symlink in the root is followed as if the root
were /, never out of it.

The result file /etc/.ignition-result.json (Ignition's and Flatcar's; written last) records that
the host was provisioned by Ignition: ``apply`` does nothing while it exists (Ignition runs on the
first boot only), and cloud-config is not applied on top of it (Flatcar's rule, see
``provisioned_by_ignition``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudconfig.ignition import load
from cloudconfig.ignition.fetch import ACCEPT_CONFIG, Fetcher, FetchError, describe
from cloudconfig.ignition.merge import merge
from cloudconfig.ignition.passwd import Tables, plan_groups, plan_home_and_keys, plan_users
from cloudconfig.ignition.report import IgnitionReport
from cloudconfig.ignition.spec import LATEST, SPECS, Checker, clean_path
from cloudconfig.rootfs import Change, ConfigApplyError, Plan
from cloudconfig.units import install_section
from cloudconfig.users import lookup_group, lookup_user
from cloudconfig.validate import MAX_USERDATA
from obelisk.errors import EXIT_FAILED

MARKER = "/etc/.ignition-result.json"
PRESET = "/etc/systemd/system-preset/20-ignition.preset"
SYSTEMD = "/etc/systemd/system"
UNIT_SEARCH = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
MAX_REFERENCE_DEPTH = 8  # replace/merge chains
MAX_CONFIGS = 32  # configs fetched in one run (merges fan out)
MAX_TOTAL = 256 * 1024 * 1024  # all file contents of one run, held in memory until commit
MAX_SYMLINKS = 40  # as the kernel's ELOOP


class InvalidIgnition(ConfigApplyError):
    """A config (the user's or one it references) has errors; ``report`` has them. Nothing was changed."""

    exit_code = EXIT_FAILED  # as cloud-config's InvalidConfig and `validate`: 1 = the config has errors

    def __init__(self, message: str, report: IgnitionReport) -> None:
        super().__init__(message)
        self.report = report


class IgnitionPlan(Plan):
    """rootfs.Plan whose result file is always the very last write, so a commit that fails part-way
    never leaves a host marked as provisioned (a storage.files entry could have planned that path first)."""

    def commit(self) -> None:
        everything = self.changes
        self.changes = [c for c in everything if c.path != MARKER] + [c for c in everything if c.path == MARKER]
        try:
            super().commit()
        finally:
            self.changes = everything


@dataclass
class IgnitionResult:
    kind: str  # "ignition" | "butane"
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    provisioned_before: bool = False  # the result file was there: nothing was done

    @property
    def changed(self) -> bool:
        return bool(self.changes) or bool(self.commands)


def is_live(root: Path) -> bool:
    try:
        return os.path.samefile(root, "/")
    except OSError:
        return False


def marker_of(root: Path) -> dict[str, Any] | None:
    """The result file's contents (None when there is none; {} when it cannot be read as JSON)."""
    p = Path(root) / MARKER.lstrip("/")
    try:
        data = json.loads(p.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def provisioned_by_ignition(root: Path) -> bool:
    """Flatcar's rule for cloud-config: skip it when Ignition applied a user config to this host."""
    m = marker_of(root)
    return m is not None and m.get("userConfigProvided", True) is not False


# --- rendering merge/replace ----------------------------------------------------------------------

@dataclass
class _Run:
    fetcher: Fetcher
    warnings: list[str]
    configs: int = 0


def _latest(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every config is taken to the newest spec before merging, as Ignition does."""
    out = dict(cfg)
    out["ignition"] = {**cfg.get("ignition", {}), "version": LATEST}
    return out


def render(cfg: dict[str, Any], run: _Run, depth: int = 0) -> dict[str, Any]:
    """ignition.config.replace / merge, resolved recursively (Ignition's RenderConfig)."""
    ref_cfg = cfg.get("ignition", {}).get("config", {})
    replace = ref_cfg.get("replace", {})
    if replace.get("source") is not None:
        new = _referenced(replace, run, depth)
        run.fetcher.configure(new.get("ignition", {}))
        return render(new, run, depth + 1)
    merged = cfg
    for ref in ref_cfg.get("merge", []):
        new = _referenced(ref, run, depth)
        run.fetcher.configure(merge(merged, new).get("ignition", {}))
        new = render(new, run, depth + 1)
        merged = merge(merged, new)
    return merged


def _referenced(ref: dict[str, Any], run: _Run, depth: int) -> dict[str, Any]:
    src = describe(ref.get("source") or "")
    if depth >= MAX_REFERENCE_DEPTH:
        raise ConfigApplyError(f"config from {src}: configs reference each other more than {MAX_REFERENCE_DEPTH} "
                               "levels deep (a loop?); nothing was changed")
    run.configs += 1
    if run.configs > MAX_CONFIGS:
        raise ConfigApplyError(f"config from {src}: more than {MAX_CONFIGS} configs referenced in all; nothing "
                               "was changed")
    data = run.fetcher.fetch_resource(ref, what="config", accept=ACCEPT_CONFIG)
    if len(data) > MAX_USERDATA:
        raise FetchError(f"config from {src} is {len(data)} bytes; the limit is {MAX_USERDATA}")
    rep = load.read(data, butane_ok=False)
    if not rep.ok or rep.value is None:
        raise InvalidIgnition(f"config from {src} has {len(rep.errors) or 1} error(s); nothing was changed", rep)
    run.warnings += [f"{src}: {e.text()}" for e in rep.entries]
    return _latest(rep.value)


# --- planning -------------------------------------------------------------------------------------

class Resolver:
    """In-root paths with the root's symlinks followed as if the root were / (Ignition's JoinPath,
    applied to every parent, not only the first level); the last component is never followed.
    A path to write that lands on /usr (the read-only image) is refused."""

    def __init__(self, plan: IgnitionPlan) -> None:
        self.plan = plan

    def __call__(self, path: str) -> str:
        out = self.read_path(path)
        if out == "/usr" or out.startswith("/usr/"):
            raise ConfigApplyError(f"{path} resolves to {out} in {self.plan.root} (through a symlink): /usr is the "
                                   "signed read-only image; nothing was changed")
        return out

    def read_path(self, path: str) -> str:
        parts = [p for p in path.split("/") if p]
        if not parts:
            return "/"
        last = parts.pop()
        done: list[str] = []
        todo = deque(parts)
        hops = 0
        while todo:
            comp = todo.popleft()
            if comp in ("", "."):
                continue
            if comp == "..":
                if done:
                    done.pop()
                continue
            cand = "/" + "/".join([*done, comp])
            host = self.plan.host(cand)
            if self.plan.planned(cand) is None and os.path.islink(host):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise ConfigApplyError(f"{path}: too many levels of symbolic links in {self.plan.root}")
                target = os.readlink(host)
                if target.startswith("/"):
                    done = []
                todo.extendleft(reversed([p for p in target.split("/") if p]))
            else:
                done.append(comp)
        return "/" + "/".join([*done, last])


def plan(raw: bytes, root: Path | str, *, files_dir: str | os.PathLike[str] | None = None,
         fetcher: Fetcher | None = None, live: bool | None = None, name: str = "config",
         force: bool = False) -> tuple[IgnitionPlan, IgnitionReport, list[str]]:
    """Validate, render and plan ``raw`` onto ``root``; nothing is written. Returns (plan, report, warnings)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigApplyError(f"target root {root} is not a directory")
    rep = load.read(raw, files_dir=files_dir)
    if not rep.ok or rep.value is None:
        raise InvalidIgnition(f"{name} has {len(rep.errors) or 1} error(s); nothing was changed", rep)
    warnings = [e.text() for e in rep.entries]
    own = fetcher is None
    f = fetcher or Fetcher()
    try:
        cfg = _latest(rep.value)
        f.configure(cfg.get("ignition", {}))
        run = _Run(f, warnings)
        rendered = render(cfg, run)
        if run.configs:
            _recheck(rendered)
        blobs = _fetch_contents(rendered, f)
    finally:
        if own:
            f.close()
    p = IgnitionPlan(root)
    live = is_live(root) if live is None else live
    _plan_config(p, rendered, blobs, live)
    _plan_marker(p, raw, rep, live, force)
    return p, rep, warnings


def _recheck(cfg: dict[str, Any]) -> None:
    """Two valid configs can merge into an invalid one (the merge rules say so): check the result."""
    rep = IgnitionReport("ignition", version=LATEST, spec=LATEST)
    Checker(lambda ptr, level, msg: rep.add(0, 0, level, ptr, f"merged config: {msg}"), SPECS[LATEST]).run(cfg)
    if rep.errors:
        rep.entries = rep.errors
        raise InvalidIgnition(f"the merged config has {len(rep.errors)} error(s); nothing was changed", rep)


def _fetch_contents(cfg: dict[str, Any], f: Fetcher) -> dict[int, list[bytes | None]]:
    """Per file: [contents (None: no source), *fragments], all fetched and verified before any write."""
    out: dict[int, list[bytes | None]] = {}
    total = 0
    for i, file in enumerate(cfg.get("storage", {}).get("files", [])):
        contents = file.get("contents", {})
        base = f.fetch_resource(contents, what=f"contents of {file['path']}") \
            if contents.get("source") is not None else None
        frags = [f.fetch_resource(frag, what=f"fragment appended to {file['path']}") for frag in file.get("append", [])]
        total += len(base or b"") + sum(len(b) for b in frags)
        if total > MAX_TOTAL:
            raise FetchError(f"the files of this config add up to more than {MAX_TOTAL} bytes; nothing was changed")
        out[i] = [base, *frags]
    return out


def _plan_config(p: IgnitionPlan, cfg: dict[str, Any], blobs: dict[int, list[bytes | None]], live: bool) -> None:
    resolve = Resolver(p)
    pw = cfg.get("passwd", {})
    if pw.get("groups") or pw.get("users"):
        tb = Tables(p)
        plan_groups(tb, pw.get("groups", []), p.notes)
        homes = plan_users(tb, pw.get("users", []), p.notes)
        tb.write("passwd")
        for u in homes:
            plan_home_and_keys(p, u, resolve)
    _plan_storage(p, cfg.get("storage", {}), blobs, resolve)
    _plan_units(p, cfg.get("systemd", {}).get("units", []), resolve, live)


# --- storage ---

def _depth(path: str) -> int:
    return len([x for x in path.split("/") if x])


def _plan_storage(p: IgnitionPlan, st: dict[str, Any], blobs: dict[int, list[bytes | None]],
                  resolve: Resolver) -> None:
    entries: list[tuple[str, int, dict[str, Any], str]] = []
    where: dict[str, str] = {}
    for sect in ("directories", "files", "links"):
        for i, node in enumerate(st.get(sect, [])):
            real = resolve(node["path"])
            if real in where:
                raise ConfigApplyError(f"{node['path']} resolves to {real} after following symlinks in {p.root}, "
                                       f"as {where[real]} does; nothing was changed")
            where[real] = node["path"]
            entries.append((sect, i, node, real))
    soft = [e for e in entries if not (e[0] == "links" and e[2].get("hard"))]
    hard = [e for e in entries if e[0] == "links" and e[2].get("hard")]
    soft.sort(key=lambda e: _depth(e[3]))  # stable: config order within one depth, as Ignition's sort.Slice
    for sect, i, node, real in [*soft, *hard]:
        if sect == "directories":
            _plan_dir(p, node, real)
        elif sect == "files":
            _plan_file(p, node, real, blobs.get(i) or [None])
        else:
            _plan_link(p, node, real, resolve)


def _owner(p: Plan, node: dict[str, Any], uid: int, gid: int) -> tuple[int, int]:
    u, g = node.get("user", {}), node.get("group", {})
    if u.get("id") is not None:
        uid = u["id"]
    elif u.get("name"):
        acct = lookup_user(p, u["name"])
        if acct is None:
            raise ConfigApplyError(f"{node['path']}: no such user {u['name']!r} in {p.root}/etc/passwd (add it "
                                   "under passwd.users or give user.id)")
        uid = acct.uid
    if g.get("id") is not None:
        gid = g["id"]
    elif g.get("name"):
        found = lookup_group(p, g["name"])
        if found is None:
            raise ConfigApplyError(f"{node['path']}: no such group {g['name']!r} in {p.root}/etc/group (add it "
                                   "under passwd.groups or give group.id)")
        gid = found
    return uid, gid


def _refuse_tree(p: IgnitionPlan, path: str, node: dict[str, Any]) -> None:
    if any(p.host(path).iterdir()):
        raise ConfigApplyError(f"{node['path']}: a directory with contents exists there and overwrite is true; "
                               "obelisk does not delete directory trees when provisioning (nothing was changed)")


def _plan_file(p: IgnitionPlan, f: dict[str, Any], path: str, parts: list[bytes | None]) -> None:
    """Ignition's fileEntry.create: with overwrite false an existing regular file is kept (and
    appended to) only when the config gives no contents; otherwise it is an error."""
    kind = p.kind(path)
    over = bool(f.get("overwrite"))
    base, fragments = parts[0], parts[1:]
    uid, gid, mode = 0, 0, 0o644
    if kind == "dir":
        if over:
            _refuse_tree(p, path, f)
        raise ConfigApplyError(f"{f['path']}: a directory exists there; obelisk does not replace it by a file "
                               "(nothing was changed)")
    if kind is not None and not over:
        if kind != "file":
            raise ConfigApplyError(f"{f['path']}: a non-regular file exists there already and overwrite is false "
                                   "(nothing was changed)")
        if base is not None:
            raise ConfigApplyError(f"{f['path']}: a file exists there already and overwrite is false; set "
                                   "overwrite: true to replace it (nothing was changed)")
        uid, gid, mode = p.owner_mode(path) or (0, 0, 0o644)
        base = p.read(path) or b""
    data = (base or b"") + b"".join(x or b"" for x in fragments)
    uid, gid = _owner(p, f, uid, gid)
    if f.get("mode") is not None:
        mode = f["mode"] & 0o777  # special bits are masked for specs before 3.6.0, as Ignition does
    p.write(path, data, mode, uid, gid, why="storage.files")


def _plan_dir(p: IgnitionPlan, d: dict[str, Any], path: str) -> None:
    kind = p.kind(path)
    uid, gid, mode = 0, 0, 0o755
    if kind == "dir":
        if d.get("overwrite"):
            _refuse_tree(p, path, d)  # an empty directory is "removed and created again": its defaults apply
        else:
            uid, gid, mode = p.owner_mode(path) or (0, 0, 0o755)
    elif kind is not None:
        why = "obelisk does not replace it by a directory" if d.get("overwrite") else "overwrite is false"
        raise ConfigApplyError(f"{d['path']}: a non-directory already exists there and {why} (nothing was changed)")
    uid, gid = _owner(p, d, uid, gid)
    if d.get("mode") is not None:
        mode = d["mode"] & 0o777
    p.mkdir(path, mode, uid, gid, why="storage.directories")


def _plan_link(p: IgnitionPlan, link: dict[str, Any], path: str, resolve: Resolver) -> None:
    kind = p.kind(path)
    target = link["target"]
    over = bool(link.get("overwrite"))
    if kind == "dir":
        raise ConfigApplyError(f"{link['path']}: a directory exists there; obelisk does not replace it by a link "
                               "(nothing was changed)")
    if link.get("hard"):
        _plan_hardlink(p, link, path, resolve(target if target.startswith("/") else "/" + target), kind, over)
        return
    if kind is not None and not over:
        ch = p.planned(path)
        if kind == "link":
            current = (ch.target or "") if ch is not None else os.readlink(p.host(path))
            if clean_path(current) == clean_path(target):
                return
            raise ConfigApplyError(f"{link['path']}: a symlink exists at that path but points to {current}, not "
                                   f"{target}, and overwrite is false (nothing was changed)")
        raise ConfigApplyError(f"{link['path']}: a non-symlink already exists at that path and overwrite is false "
                               "(nothing was changed)")
    uid, gid = _owner(p, link, 0, 0)
    # 0 is left to the committer (root on a host); lchown only for another owner, as Ignition's default
    p.symlink(path, target, why="storage.links", uid=uid or None, gid=gid or None)


def _plan_hardlink(p: IgnitionPlan, link: dict[str, Any], path: str, real: str, kind: str | None,
                   over: bool) -> None:
    """A relative hard link target is taken from the root, as Ignition's JoinPath does."""
    tkind = p.kind(real)
    if tkind is None:
        raise ConfigApplyError(f"{link['path']}: hard link target {link['target']} does not exist in {p.root} "
                               "(nothing was changed)")
    if tkind == "dir":
        raise ConfigApplyError(f"{link['path']}: hard link target {link['target']} is a directory")
    if kind is not None and not over:
        on_disk = p.planned(path) is None and p.planned(real) is None
        if on_disk and os.path.samestat(os.lstat(p.host(path)), os.lstat(p.host(real))):
            return  # already this link
        raise ConfigApplyError(f"{link['path']}: a file already exists at that path but is not the target and "
                               "overwrite is false (nothing was changed)")
    p.hardlink(path, real, why="storage.links")


# --- systemd ---

def _find_unit(p: Plan, resolve: Resolver, name: str) -> str | None:
    for d in UNIT_SEARCH:
        path = resolve.read_path(f"{d}/{name}")
        if p.read(path) is not None:
            return path
    return None


def _plan_units(p: IgnitionPlan, units: list[dict[str, Any]], resolve: Resolver, live: bool) -> None:
    presets: dict[str, tuple[str, bool, list[str]]] = {}
    before = len(p.changes)
    enabled_any = False
    for u in units:
        name = u["name"]
        path = resolve(f"{SYSTEMD}/{name}")
        for d in u.get("dropins", []):
            if d.get("contents") is not None:
                p.write(resolve(f"{SYSTEMD}/{name}.d/{d['name']}"), d["contents"].encode(), 0o644,
                        why=f"drop-in {d['name']} of {name}")
        if u.get("contents"):
            p.write(path, u["contents"].encode(), 0o644, why=f"unit {name}")
        if u.get("mask") is True:
            p.symlink(path, "/dev/null", why=f"mask {name}")
        elif u.get("mask") is False and not u.get("contents"):
            host = p.host(path)
            if p.planned(path) is None and host.is_symlink() and os.readlink(host) == "/dev/null":
                p.remove(path, why=f"unmask {name}")
        if u.get("enabled") is None:
            continue
        on = bool(u["enabled"])
        if on and u.get("mask"):
            p.notes.append(f"{name} is masked, so enabling it does nothing")
            continue
        touched = _enable(p, resolve, name, on, set())
        if on:
            enabled_any = True
        elif not touched:
            continue  # Ignition writes "disable" only for a unit that was enabled
        tmpl, inst = _instance(name)
        ident = "enabled" if on else "disabled"
        key = f"{tmpl if inst else name}-{ident}"
        unit, _, insts = presets.get(key, (tmpl if inst else name, on, []))
        presets[key] = (unit, on, [*insts, inst] if inst else insts)
    if presets:
        lines = "".join(f"{'enable' if on else 'disable'} {unit}{''.join(' ' + i for i in insts)}\n"
                        for unit, on, insts in (presets[k] for k in sorted(presets)))
        preset = resolve(PRESET)
        p.write(preset, (p.read(preset) or b"") + lines.encode(), 0o644, why="unit presets")
    if live and len(p.changes) > before:
        p.commands.append(["systemctl", "daemon-reload"])
        if enabled_any:
            # units enabled now were not in the boot transaction; starting the default target again pulls them in
            p.commands.append(["systemctl", "--no-block", "start", "default.target"])


def _instance(name: str) -> tuple[str, str]:
    """foo@bar.service -> ("foo@.service", "bar"); foo.service -> (foo.service, "")."""
    if "@" not in name:
        return name, ""
    at, dot = name.index("@"), name.rindex(".")
    return name[:at + 1] + name[dot:], name[at + 1:dot]


def _enable(p: IgnitionPlan, resolve: Resolver, name: str, on: bool, seen: set[str]) -> bool:
    """Make (or remove) the links `systemctl enable` (disable) would; True when anything changed."""
    if name in seen:
        return False
    seen.add(name)
    tmpl, inst = _instance(name)
    src = _find_unit(p, resolve, name) or (_find_unit(p, resolve, tmpl) if inst else None)
    if src is None:
        if not on:
            return False
        raise ConfigApplyError(f"cannot enable {name}: there is no unit file {tmpl if inst else name} in "
                               f"{', '.join(UNIT_SEARCH)} of {p.root} (give its contents under systemd.units)")
    install = install_section(p.read_text(src) or "")
    link_name = name
    if "@" in name and not inst:
        default = (install.get("DefaultInstance") or [""])[-1]
        if not default:
            p.notes.append(f"{name} is a template without DefaultInstance: enable an instance (name@x.service)")
            return False
        link_name = name.replace("@.", f"@{default}.")
    links = [f"{SYSTEMD}/{t}.wants/{link_name}" for t in install.get("WantedBy", [])]
    links += [f"{SYSTEMD}/{t}.requires/{link_name}" for t in install.get("RequiredBy", [])]
    links += [f"{SYSTEMD}/{a}" for a in install.get("Alias", [])]
    if on and not links and not install.get("Also"):
        p.notes.append(f"{name} has no [Install] section (WantedBy=, RequiredBy=, Alias=): nothing to enable")
    changed = False
    for link in links:
        real = resolve(link)
        if on:
            changed |= p.symlink(real, src, why=f"enable {name}")
        elif p.kind(real) == "link":
            changed |= p.remove(real, why=f"disable {name}")
    for also in install.get("Also", []):
        changed |= _enable(p, resolve, also, on, seen)
    return changed


# --- the result file ---

def _plan_marker(p: IgnitionPlan, raw: bytes, rep: IgnitionReport, live: bool, force: bool) -> None:
    boot_id = ""
    if live:
        try:
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot_id = ""
    result: dict[str, Any] = {
        "provisioningBootID": boot_id,
        "provisioningDate": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "userConfigProvided": True,
        "provisionedBy": "obelisk",
        "configKind": rep.kind,
        "configVersion": f"{rep.variant} {rep.version}" if rep.variant else rep.version,
        "spec": rep.spec,
        "configSHA512": hashlib.sha512(raw).hexdigest(),
    }
    previous = marker_of(p.root)
    if previous is not None and force:
        result["previousReport"] = previous
    p.write(MARKER, (json.dumps(result, indent=2) + "\n").encode(), 0o600, why="provisioned by Ignition")


def apply(raw: bytes, root: Path | str, *, files_dir: str | os.PathLike[str] | None = None,
          fetcher: Fetcher | None = None, live: bool | None = None, dry_run: bool = False, force: bool = False,
          name: str = "config", run_command: Callable[[list[str]], None] | None = None) -> IgnitionResult:
    """First boot only: apply when the result file is absent (or ``force``), commit, run live commands.

    Raises InvalidIgnition / ConfigApplyError / FetchError (all ObeliskError): nothing was changed."""
    root = Path(root)
    kind = load.detect(raw) or "ignition"
    if not force and marker_of(root) is not None:
        res = IgnitionResult(kind, dry_run=dry_run, provisioned_before=True)
        res.notes.append(f"{root.as_posix().rstrip('/')}{MARKER} exists: this host was provisioned by Ignition "
                         "already and Ignition runs on the first boot only (nothing was done)")
        return res
    p, rep, warnings = plan(raw, root, files_dir=files_dir, fetcher=fetcher, live=live, name=name, force=force)
    res = IgnitionResult(rep.kind, changes=list(p.changes), notes=list(p.notes), commands=list(p.commands),
                         warnings=warnings, dry_run=dry_run)
    if dry_run:
        return res
    p.commit()
    if run_command is not None:
        for argv in p.commands:
            run_command(argv)
    return res
