"""coreos.units: unit files, drop-ins, mask and enable, the way systemctl would leave them.

On a root that is not the running system, enabling means creating the symlinks `systemctl
enable` would create (from the unit's [Install] section); on the live system systemctl itself
is used and the units' commands are run after a daemon-reload.
"""

from __future__ import annotations

from cloudconfig.model import Unit
from cloudconfig.rootfs import ConfigApplyError, Plan

NETWORK_SUFFIXES = (".network", ".netdev", ".link")
SEARCH = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
# CoreOS ran etcd 2 as etcd2.service (etcd-member.service later); obelisk ships Debian's etcd.service.
ETCD_ALIASES = ("etcd2.service", "etcd-member.service")


def unit_dir(u: Unit) -> str:
    base = "/run" if u.runtime else "/etc"
    return f"{base}/systemd/network" if u.name.endswith(NETWORK_SUFFIXES) else f"{base}/systemd/system"


def install_section(text: str) -> dict[str, list[str]]:
    """WantedBy/RequiredBy/Alias/Also of a unit file (repeated keys accumulate, as in systemd)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Install" and "=" in line:
            k, _, v = line.partition("=")
            if not v.strip():
                out[k.strip()] = []  # an empty assignment resets the list
            else:
                out.setdefault(k.strip(), []).extend(v.split())
    return out


def find_unit(plan: Plan, name: str) -> str | None:
    for d in SEARCH:
        if plan.exists(f"{d}/{name}") and plan.read(f"{d}/{name}") is not None:
            return f"{d}/{name}"
    return None


def normalize(u: Unit, notes: list[str]) -> Unit:
    if u.name in ETCD_ALIASES and u.content is None:
        notes.append(f"{u.name} is etcd.service on obelisk (etcd 3.4); using etcd.service")
        u.name = "etcd.service"
    return u


def plan_unit(plan: Plan, u: Unit, live: bool) -> None:
    d = unit_dir(u)
    path = f"{d}/{u.name}"
    is_net = u.name.endswith(NETWORK_SUFFIXES)
    if u.mask:
        plan.symlink(path, "/dev/null", why=f"mask {u.name}")
    else:
        # not masked in this config: undo a mask from an earlier one (in /etc and /run, as systemctl unmask)
        for base in ("/etc", "/run"):
            mpath = f"{base}/{d.split('/', 2)[2]}/{u.name}"
            if plan.link_target(mpath) == "/dev/null" and (mpath != path or u.content is None):
                plan.remove(mpath, why=f"unmask {u.name}")
        if u.content is not None:
            plan.write(path, u.content.encode(), 0o644, why=f"unit {u.name}")
    for di in u.drop_ins:
        plan.write(f"{d}/{u.name}.d/{di.name}", di.content.encode(), 0o644, why=f"drop-in of {u.name}")
    if u.enable and not is_net and not u.mask:
        if live:
            plan.commands.append(["systemctl", "enable", *(["--runtime"] if u.runtime else []), u.name])
        else:
            _plan_enable(plan, u, path)
    if u.command and not is_net:
        if live:
            plan.commands.append(["systemctl", "--no-block", u.command, u.name])
        else:
            plan.notes.append(f"not run (target root is not the running system): systemctl {u.command} {u.name}")


def _plan_enable(plan: Plan, u: Unit, written: str) -> None:
    src = written if u.content is not None else find_unit(plan, u.name)
    if src is None:
        raise ConfigApplyError(f"cannot enable {u.name}: no such unit in {plan.root} "
                               "(give its content: under the unit)")
    if "@" in u.name and u.name.split("@", 1)[1].startswith("."):
        raise ConfigApplyError(f"cannot enable template {u.name} without an instance (use name@instance.service)")
    inst = install_section(plan.read_text(src) or "")
    edir = "/run/systemd/system" if u.runtime else "/etc/systemd/system"
    links = [(f"{edir}/{t}.wants/{u.name}") for t in inst.get("WantedBy", [])]
    links += [(f"{edir}/{t}.requires/{u.name}") for t in inst.get("RequiredBy", [])]
    links += [f"{edir}/{a}" for a in inst.get("Alias", [])]
    if not links:
        plan.notes.append(f"{u.name} has no [Install] section (WantedBy=, RequiredBy=, Alias=): nothing to enable")
    for link in links:
        plan.symlink(link, src, why=f"enable {u.name}")
