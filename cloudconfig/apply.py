"""Apply user-data to a target root: validate, plan every change, then commit them together.

Order follows coreos-cloudinit: hostname, users, the core user's keys, write_files and the
generated files (etcd, update.conf, lock.conf, /etc/hosts, /etc/environment), then units.
Nothing is written unless the whole config validated and planned without error.

Ignition JSON and Butane YAML go to the Ignition engine (cloudconfig.ignition: first boot only);
once Ignition provisioned a host, cloud-config is not applied on top of it (Flatcar's rule).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cloudconfig import bootstrap, ignition, schema, units, users
from cloudconfig.datasources import Metadata
from cloudconfig.model import CloudConfig, User
from cloudconfig.rootfs import Change, ConfigApplyError, Plan
from cloudconfig.validate import (
    Report,
    classify,
    decode_content,
    decode_userdata,
    substitute,
    used_variables,
    validate_text,
)
from obelisk.errors import EXIT_FAILED

SCRIPT_PATH = "/var/lib/obelisk/cloudconfig/scripts/user-data"
CORE_USER = "core"
CORE_USER_SPEC = User(name=CORE_USER, gecos="obelisk admin")


class InvalidConfig(ConfigApplyError):
    """Validation found errors; ``report`` has them with line numbers. Nothing was changed."""

    exit_code = EXIT_FAILED  # as `validate`: 1 = the config has errors

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ApplyResult:
    kind: str
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    skipped: bool = False  # nothing was applied on purpose; the reason is in notes

    @property
    def changed(self) -> bool:
        return bool(self.changes) or bool(self.commands)


def is_live(root: Path) -> bool:
    try:
        return root.resolve() == Path("/").resolve() or os.path.samefile(root, "/")
    except OSError:
        return False


def apply_userdata(raw: bytes, root: Path, *, metadata: Metadata | None = None,
                   addresses: dict[str, str] | None = None, live: bool | None = None,
                   dry_run: bool = False, name: str = "user-data", files_dir: Path | None = None,
                   force: bool = False, fetcher: ignition.Fetcher | None = None) -> ApplyResult:
    """Validate and apply; raises InvalidConfig / ConfigApplyError (nothing changed) on any problem.

    Ignition/Butane user-data is applied by ``cloudconfig.ignition`` (``files_dir``, ``force`` and
    ``fetcher`` are its); it raises InvalidIgnition / FetchError, also with nothing changed."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigApplyError(f"target root {root} is not a directory")
    live = is_live(root) if live is None else live
    if ignition.detect(raw):
        return _apply_ignition(raw, root, live=live, dry_run=dry_run, name=name, files_dir=files_dir, force=force,
                               fetcher=fetcher)
    if ignition.provisioned_by_ignition(root):
        return _skipped_for_ignition(root, dry_run)
    md = metadata or Metadata()
    values = {**md.addresses(), **(addresses or {})}
    for key, value in values.items():
        # substituted into the YAML text: anything but an address could inject keys
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ConfigApplyError(f"{key} {value[:60]!r} (from the datasource or environment) is not an IP address; "
                             "nothing was changed") from None
    text, bad = decode_userdata(raw)
    if bad is not None:
        raise InvalidConfig(f"{name}: {bad.entries[0].message}; nothing was changed", bad)
    assert text is not None
    kind = classify(text)
    plan = Plan(root)
    result = ApplyResult(kind, dry_run=dry_run)
    if kind == "invalid":
        rep = Report("invalid")
        rep.add(1, 1, "error", "", 'the first line must be "#cloud-config" or begin with "#!" (a script)')
        raise InvalidConfig(f"{name}: unrecognized user-data format; nothing was changed", rep)
    if kind == "ignition":  # JSON that detect's quick look missed (escaped key names): the engine reports it
        return _apply_ignition(raw, root, live=live, dry_run=dry_run, name=name, files_dir=files_dir, force=force,
                               fetcher=fetcher)
    missing = sorted(v for v in used_variables(text) if v not in values)
    if kind == "cloud-config" and missing:
        raise ConfigApplyError(f"{name} uses ${missing[0]} but the datasource gave no {missing[0].replace('_', ' ')} "
                         f"address; set COREOS_{missing[0].upper()} in the environment or avoid the variable "
                         "(nothing was changed)")
    cfg = CloudConfig()
    if kind == "cloud-config":
        rep = validate_text(substitute(text, values))
        if rep.errors:
            raise InvalidConfig(f"{name} has {len(rep.errors)} error(s); nothing was changed", rep)
        result.warnings = [e.text() for e in rep.entries]
        cfg = CloudConfig.from_value(rep.value or {})
    elif kind == "script":
        _plan_script(plan, text.encode(), live)
    if kind in ("cloud-config", "empty", "script"):  # metadata (hostname, keys) applies to all three
        if live:
            # Plan once with users written into the account files, only to prove every owner, group and
            # unit resolves before useradd changes anything; then create users and plan for real.
            _plan_config(Plan(root), cfg, md, values, live, users_in_files=True)
            if not dry_run:
                _live_users(cfg, bool(cfg.ssh_authorized_keys or md.public_keys))
        _plan_config(plan, cfg, md, values, live)
    result.changes, result.notes, result.commands = plan.changes, [*result.notes, *plan.notes], plan.commands
    if dry_run:
        return result
    plan.commit()
    if live:
        _run_commands(plan)
    return result


def _apply_ignition(raw: bytes, root: Path, *, live: bool, dry_run: bool, name: str, files_dir: Path | None,
                    force: bool, fetcher: ignition.Fetcher | None) -> ApplyResult:
    failed: list[str] = []
    res = ignition.apply(raw, root, files_dir=files_dir, fetcher=fetcher, live=live, dry_run=dry_run, force=force,
                         name=name, run_command=_runner(failed) if live else None)
    return ApplyResult(res.kind, changes=res.changes, notes=[*res.notes, *failed], commands=res.commands,
                       warnings=res.warnings, dry_run=dry_run, skipped=res.provisioned_before)


def _skipped_for_ignition(root: Path, dry_run: bool) -> ApplyResult:
    when = (ignition.marker_of(root) or {}).get("provisioningDate") or "an unknown time"
    res = ApplyResult("cloud-config", dry_run=dry_run, skipped=True)
    res.notes.append(f"{root.as_posix().rstrip('/')}{ignition.MARKER}: provisioned by Ignition at {str(when)[:40]}: "
                     "cloud-config is not applied on top (Flatcar's rule)")
    return res


def _runner(failed: list[str]) -> Callable[[list[str]], None]:
    """systemctl after an Ignition commit: a failure is a note (the files are in place), as for cloud-config."""
    def run_one(argv: list[str]) -> None:  # pragma: no cover - systemctl only exists on the running system
        from obelisk.tools import ToolError, run

        try:
            run(argv, timeout=120)
        except ToolError as exc:
            failed.append(f"{' '.join(argv)} failed: {exc}")
    return run_one


def _plan_script(plan: Plan, data: bytes, live: bool) -> None:
    plan.write(SCRIPT_PATH, data, 0o744, why="#! user-data")
    if live:
        unit = "obelisk-cloudconfig-script-" + hashlib.sha256(data).hexdigest()[:12]
        plan.commands.append(["systemd-run", f"--unit={unit}", "--collect", SCRIPT_PATH])
    else:
        plan.notes.append(f"script saved to {SCRIPT_PATH}; not run (target root is not the running system)")


def _plan_config(plan: Plan, cfg: CloudConfig, md: Metadata, values: dict[str, str], live: bool,
                 users_in_files: bool = False) -> None:
    # hostname: user-data wins over metadata
    host = cfg.hostname
    if not host and md.hostname:
        short = md.hostname.split(".")[0]
        if schema.hostname(short) is None:
            host = short
        else:
            plan.notes.append(f"ignored the metadata hostname {md.hostname[:60]!r}: not a valid host name")
    if host:
        plan.write("/etc/hostname", f"{host}\n".encode(), 0o644, why="hostname")
        if live:
            plan.commands.append(["hostname", host])
    # users (on the live system useradd runs before the plan is committed; see _live_users)
    by_useradd = live and not users_in_files
    for u in cfg.users:
        if by_useradd and users.lookup_user(plan, u.name) is None:
            plan.notes.append(f"user {u.name} is created with useradd")  # dry run on the live system
            continue
        users.plan_user(plan, u)
    keys = [*cfg.ssh_authorized_keys, *md.public_keys]
    if keys:
        if users.lookup_user(plan, CORE_USER) is None:
            if by_useradd:
                plan.notes.append(f"user {CORE_USER} is created with useradd")
            else:
                users.plan_user(plan, CORE_USER_SPEC)
        if users.lookup_user(plan, CORE_USER) is not None:
            users.plan_keys(plan, CORE_USER, keys)
    # write_files
    tls = _tls_paths(cfg)
    for wf in cfg.write_files:
        data = decode_content(wf.content, wf.encoding)
        mode = int(wf.permissions, 8) if wf.permissions else (0o600 if wf.path in tls["private"] else 0o644)
        owner = wf.owner
        if owner is None and wf.path in tls["etcd"] and users.lookup_user(plan, "etcd") is not None:
            owner = "etcd:etcd" if users.lookup_group(plan, "etcd") is not None else "etcd"
        uid, gid = users.resolve_owner(plan, owner)
        plan.write(wf.path, data, mode, uid, gid, why="write_files")
    written = {wf.path for wf in cfg.write_files}
    tls_changed = any(c.path in tls["etcd"] | tls["private"] for c in plan.changes)
    bootstrap.plan_etcd(plan, cfg, live, tls_changed)
    bootstrap.plan_update(plan, cfg)
    bootstrap.plan_lock(plan, cfg)
    if cfg.oem.get("id"):
        plan.write("/etc/oem-release", "".join(f"{k.upper()}={v}\n" for k, v in cfg.oem.items()).encode(), 0o644,
                   why="coreos.oem")
    if cfg.manage_etc_hosts == "localhost" and "/etc/hosts" not in written:
        name = host or (plan.read_text("/etc/hostname") or "").strip() or "localhost"
        hosts = f"# Written by obelisk cloudconfig (manage_etc_hosts: localhost)\n127.0.0.1 localhost {name}\n" \
                f"::1 localhost {name}\n"
        plan.write("/etc/hosts", hosts.encode(), 0o644, why="manage_etc_hosts")
    if values and "/etc/environment" not in written:
        _plan_environment(plan, values)
    # units last: they may be enabled against files written above
    network_changed = False
    for u in cfg.units:
        u = units.normalize(u, plan.notes)
        before = len(plan.changes)
        units.plan_unit(plan, u, live)
        network_changed |= u.name.endswith(units.NETWORK_SUFFIXES) and len(plan.changes) > before
    if live and any(c.path.startswith(("/etc/systemd", "/run/systemd")) for c in plan.changes):
        plan.commands.insert(0, ["systemctl", "daemon-reload"])
        if network_changed:
            plan.commands.append(["systemctl", "restart", "systemd-networkd"])


def _tls_paths(cfg: CloudConfig) -> dict[str, set[str]]:
    etcd = {cfg.etcd[k] for k in bootstrap.TLS_KEYS if k in cfg.etcd}
    private = {cfg.etcd[k] for k in bootstrap.PRIVATE_KEYS if k in cfg.etcd}
    if "etcd_keyfile" in cfg.locksmith:
        private.add(cfg.locksmith["etcd_keyfile"])
    return {"etcd": etcd, "private": private}


def _plan_environment(plan: Plan, values: dict[str, str]) -> None:
    """COREOS_PRIVATE_IPV4=... in /etc/environment (units use EnvironmentFile=/etc/environment)."""
    lines = (plan.read_text("/etc/environment") or "").splitlines()
    want = {f"COREOS_{k.upper()}": v for k, v in values.items()}
    out = []
    for ln in lines:
        key = ln.split("=", 1)[0].strip()
        if key in want:
            out.append(f"{key}={want.pop(key)}")
        else:
            out.append(ln)
    out += [f"{k}={v}" for k, v in sorted(want.items())]
    plan.write("/etc/environment", ("\n".join(out) + "\n").encode(), 0o644, why="addresses from metadata")


def _live_users(cfg: CloudConfig, need_core: bool) -> None:  # pragma: no cover - edits this machine's accounts
    """useradd for users the running system does not have yet; passwords and keys go through the plan."""
    from obelisk.tools import run

    live = Plan(Path("/"))
    wanted = [*cfg.users, *([CORE_USER_SPEC] if need_core else [])]
    for u in wanted:
        if users.lookup_user(live, u.name) is None:
            for argv in users.live_user_commands(u, exists=False):
                run(argv, timeout=60)


def _run_commands(plan: Plan) -> None:  # pragma: no cover - systemctl only exists on the running system
    from obelisk.tools import ToolError, run

    for argv in plan.commands:
        try:
            run(argv, timeout=120)
        except ToolError as exc:
            plan.notes.append(f"{' '.join(argv)} failed: {exc}")
