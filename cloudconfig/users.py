"""Users, groups and SSH keys, planned into a target root's passwd/group/shadow files.

On a root that is not the running system useradd cannot be used (it would edit this machine),
so the account files are edited directly with useradd's rules: new users get the next free
UID (system users count down from 999), a group of their own unless told otherwise, a locked
password ("*") when no hash is given, and a home directory. As in coreos-cloudinit, an existing
user only gets its password hash and SSH keys updated.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass

from cloudconfig.model import User
from cloudconfig.rootfs import ConfigApplyError, Plan, norm
from cloudconfig.schema import MAX_ID

KEYS_NAME = "obelisk-cloudconfig"  # file under ~/.ssh/authorized_keys.d/, like update-ssh-keys' coreos-cloudinit


@dataclass
class Account:
    name: str
    uid: int
    gid: int
    home: str


def _table(plan: Plan, path: str) -> list[list[str]]:
    text = plan.read_text(path) or ""
    return [ln.split(":") for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _render(rows: list[list[str]]) -> bytes:
    return "".join(":".join(r) + "\n" for r in rows).encode()


def _id(text: str, where: str) -> int:
    """A uid/gid from a config or the root's account files, in chown's range, or a clear error."""
    if not text.isdigit() or int(text) > MAX_ID:
        raise ConfigApplyError(f"{where}: id {text[:20]!r} is not a number from 0 to {MAX_ID}")
    return int(text)


def lookup_user(plan: Plan, name: str) -> Account | None:
    for r in _table(plan, "/etc/passwd"):
        if len(r) >= 6 and (r[0] == name or (name.isdigit() and r[2] == name)):
            where = f"user {r[0]} in {plan.root}/etc/passwd"
            return Account(r[0], _id(r[2], where), _id(r[3], where), r[5])
    return None


def lookup_group(plan: Plan, name: str) -> int | None:
    for r in _table(plan, "/etc/group"):
        if len(r) >= 3 and (r[0] == name or (name.isdigit() and r[2] == name)):
            return _id(r[2], f"group {r[0]} in {plan.root}/etc/group")
    return _id(name, f"group {name}") if name.isdigit() else None


def resolve_owner(plan: Plan, owner: str | None) -> tuple[int, int]:
    """'user', 'user:group' or 'uid:gid' -> numbers, looked up in the target root."""
    if not owner:
        return 0, 0
    uname, _, gname = owner.partition(":")
    acct = lookup_user(plan, uname)
    if acct is None:
        if not uname.isdigit():
            raise ConfigApplyError(f"owner {owner!r}: user {uname!r} does not exist in {plan.root}/etc/passwd; "
                             "create it under users: or use a numeric uid")
        uid = gid = _id(uname, f"owner {owner!r}")
    else:
        uid, gid = acct.uid, acct.gid
    if gname:
        g = lookup_group(plan, gname)
        if g is None:
            raise ConfigApplyError(f"owner {owner!r}: group {gname!r} does not exist in {plan.root}/etc/group")
        gid = g
    return uid, gid


def _free_id(used: set[int], system: bool) -> int:
    if system:
        for i in range(999, 99, -1):
            if i not in used:
                return i
        raise ConfigApplyError("no free system id between 100 and 999")
    i = max([u for u in used if 1000 <= u < 60000], default=999) + 1
    return i


def plan_user(plan: Plan, u: User) -> None:
    passwd = _table(plan, "/etc/passwd")
    shadow = _table(plan, "/etc/shadow")
    groups = _table(plan, "/etc/group")
    existing = next((r for r in passwd if r[0] == u.name), None)
    if existing is None:
        uids = {int(r[2]) for r in passwd if len(r) > 2 and r[2].isdigit()}
        gids = {int(r[2]) for r in groups if len(r) > 2 and r[2].isdigit()}
        uid = _free_id(uids, u.system)
        if u.primary_group:
            gid = lookup_group(plan, u.primary_group)
            if gid is None:
                raise ConfigApplyError(f"user {u.name}: primary_group {u.primary_group!r} does not exist in "
                                 f"{plan.root}/etc/group")
        elif u.no_user_group:
            gid = lookup_group(plan, "users") or 100
        else:
            if any(r[0] == u.name for r in groups):
                raise ConfigApplyError(f"user {u.name}: a group named {u.name} already exists; set primary_group or "
                                 "no_user_group")
            gid = uid if uid not in gids else _free_id(gids | uids, u.system)
            groups.append([u.name, "x", str(gid), ""])
        home = u.homedir or f"/home/{u.name}"
        passwd.append([u.name, "x", str(uid), str(gid), u.gecos or "", home, u.shell or "/bin/bash"])
        shadow.append([u.name, u.passwd or "*", str(int(time.time() // 86400)), "0", "99999", "7", "", "", ""])
        for g in u.groups:
            row = next((r for r in groups if r[0] == g), None)
            if row is None:
                raise ConfigApplyError(f"user {u.name}: group {g!r} does not exist in {plan.root}/etc/group; "
                                 "remove it from groups or create it in the image")
            while len(row) < 4:
                row.append("")
            members = [m for m in row[3].split(",") if m]
            if u.name not in members:
                row[3] = ",".join([*members, u.name])
        plan.write("/etc/passwd", _render(passwd), 0o644, why=f"user {u.name}")
        plan.write("/etc/group", _render(groups), 0o644, why=f"user {u.name}")
        plan.write("/etc/shadow", _render(shadow), 0o640 if _shadow_gid(plan) else 0o600, gid=_shadow_gid(plan),
                   why=f"user {u.name}")
        if not u.no_create_home:
            plan.mkdir(home, 0o700, uid, gid, why=f"home of {u.name}")
    elif u.passwd:
        row = next((r for r in shadow if r[0] == u.name), None)
        if row is None:
            shadow.append([u.name, u.passwd, str(int(time.time() // 86400)), "0", "99999", "7", "", "", ""])
        elif row[1] != u.passwd:
            row[1] = u.passwd
            if len(row) > 2:
                row[2] = str(int(time.time() // 86400))
        plan.write("/etc/shadow", _render(shadow), 0o640 if _shadow_gid(plan) else 0o600, gid=_shadow_gid(plan),
                   why=f"password of {u.name}")
    if u.ssh_authorized_keys:
        plan_keys(plan, u.name, u.ssh_authorized_keys)


def _shadow_gid(plan: Plan) -> int:
    return lookup_group(plan, "shadow") or 0


def plan_keys(plan: Plan, user: str, keys: list[str]) -> None:
    """Keys go to ~/.ssh/authorized_keys.d/obelisk-cloudconfig; authorized_keys is the join of that dir."""
    acct = lookup_user(plan, user)
    if acct is None:
        raise ConfigApplyError(f"ssh keys for {user}: user does not exist in {plan.root}/etc/passwd")
    home = _home(plan, acct)
    plan.mkdir(home, 0o700, acct.uid, acct.gid, why=f"home of {user}") if not plan.exists(home) else None
    ours = "".join(k.strip() + "\n" for k in keys if k.strip()).encode()
    plan_key_files(plan, acct, home, KEYS_NAME, ours)


def plan_key_files(plan: Plan, acct: Account, home: str, fragment: str, ours: bytes, *,
                   fix_modes: bool = True) -> None:
    """``ours`` as ~/.ssh/authorized_keys.d/``fragment``, and ~/.ssh/authorized_keys the join of that
    directory (update-ssh-keys' layout, used by cloud-config and Ignition). Keys that were in
    authorized_keys before the directory existed are kept as the fragment ``old_authorized_keys``.
    ``fix_modes``: existing ~/.ssh directories are set to 0700 and the user (cloud-config); Ignition
    only creates missing ones."""
    ssh = f"{home.rstrip('/')}/.ssh"
    ddir = f"{ssh}/authorized_keys.d"
    refuse_links_below_home(plan, acct.name, ssh)
    for d in (ssh, ddir):
        if fix_modes or not plan.exists(d):
            plan.mkdir(d, 0o700, acct.uid, acct.gid, why=f"ssh keys of {acct.name}")
    fragments: dict[str, bytes] = {}
    if plan.is_dir(ddir):
        fragments = _key_fragments(plan, acct.name, ddir)
    elif plan.exists(f"{ssh}/authorized_keys"):
        # keep keys that were there before we managed the file (update-ssh-keys does the same)
        old = plan.read(f"{ssh}/authorized_keys") or b""
        fragments["old_authorized_keys"] = old
        plan.write(f"{ddir}/old_authorized_keys", old, 0o600, acct.uid, acct.gid)
    fragments[fragment] = ours
    why = f"ssh keys of {acct.name}"
    plan.write(f"{ddir}/{fragment}", ours, 0o600, acct.uid, acct.gid, why=why)
    joined = b"".join(d if d.endswith(b"\n") or not d else d + b"\n" for _, d in sorted(fragments.items()))
    plan.write(f"{ssh}/authorized_keys", joined, 0o600, acct.uid, acct.gid, why=why)


def refuse_links_below_home(plan: Plan, user: str, ssh: str) -> None:
    """Below the home the user, not the config, controls the tree, and apply runs as root: a symlink
    there would make root write keys where it points (``~/.ssh -> /etc``), or copy the file it points
    to into a file the user owns (``~/.ssh/authorized_keys -> /etc/shadow`` would become
    ``old_authorized_keys``). A hard link does the same where the kernel allows one. All refused,
    naming the path, before anything is written."""
    for d in (ssh, f"{ssh}/authorized_keys.d"):
        _refuse_foreign(plan, user, d, directory=True)
    _refuse_foreign(plan, user, f"{ssh}/authorized_keys", directory=False)


def _refuse_foreign(plan: Plan, user: str, path: str, *, directory: bool) -> None:
    if plan.planned(path) is not None:
        return  # planned by this apply, not the user's
    st = plan.lstat(path)
    if st is None:
        return
    where = f"ssh keys of {user}: {path} in {plan.root}"
    if stat.S_ISLNK(st.st_mode):
        raise ConfigApplyError(f"{where} is a symlink (to {plan.link_target(path)}); refusing to follow it (remove "
                               "the link and apply again; nothing was changed)")
    if directory and not stat.S_ISDIR(st.st_mode):
        raise ConfigApplyError(f"{where} is not a directory; refusing to use it (nothing was changed)")
    if not directory and not stat.S_ISREG(st.st_mode):
        raise ConfigApplyError(f"{where} is not a regular file; refusing to read or replace it (nothing was "
                               "changed)")
    if not directory and st.st_nlink > 1:
        raise ConfigApplyError(f"{where} has {st.st_nlink} hard links (it may be another file, such as "
                               "/etc/shadow); refusing to read or replace it (nothing was changed)")


def _key_fragments(plan: Plan, user: str, ddir: str) -> dict[str, bytes]:
    """The fragments in authorized_keys.d (dotfiles and directories skipped), each checked as
    authorized_keys is: their contents are joined into a file the user owns."""
    out = {}
    for name in plan.listdir(ddir):
        path = f"{ddir}/{name}"
        st = plan.lstat(path)
        if name.startswith(".") or (st is not None and stat.S_ISDIR(st.st_mode)):
            continue
        _refuse_foreign(plan, user, path, directory=False)
        data = plan.read(path)
        if data is not None:
            out[name] = data
    return out


def _home(plan: Plan, acct: Account) -> str:
    """The home from passwd, refused when it could lead out of the root (relative, '..')."""
    try:
        return norm(acct.home)
    except ConfigApplyError:
        raise ConfigApplyError(f"user {acct.name}: home {acct.home!r} in {plan.root}/etc/passwd is not an absolute "
                               "path without '..'; fix the account or its homedir") from None


def live_user_commands(u: User, exists: bool) -> list[list[str]]:
    """The running system: useradd/chpasswd as coreos-cloudinit did (argv lists for obelisk.tools.run)."""
    if exists:
        return []
    argv = ["useradd"]
    if u.gecos:
        argv += ["--comment", u.gecos]
    if u.homedir:
        argv += ["--home-dir", u.homedir]
    argv += ["--no-create-home"] if u.no_create_home else ["--create-home"]
    if u.primary_group:
        argv += ["--gid", u.primary_group]
    if u.groups:
        argv += ["--groups", ",".join(u.groups)]
    if u.no_user_group:
        argv += ["--no-user-group"]
    if u.system:
        argv += ["--system"]
    if u.no_log_init:
        argv += ["--no-log-init"]
    if u.shell:
        argv += ["--shell", u.shell]
    argv += ["--password", u.passwd or "*", u.name]
    return [argv]
