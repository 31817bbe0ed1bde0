"""passwd.users and passwd.groups, planned into /etc/passwd, shadow, group (and gshadow when present).

Ignition runs groupadd/useradd (or groupmod/usermod for accounts that exist) with ``--root``;
obelisk plans the same edits as file changes so they commit with everything else. The rules are
those commands': new ids count up from 1000 (system ones down from 999), a user gets a group of
its own unless ``noUserGroup`` (then ``users``) or ``primaryGroup``, a missing password is "*"
(locked), an existing user's ``groups`` replace its supplementary groups (usermod -G), ``homeDir``
of an existing user changes the passwd field (the old home is left in place, noted), and
``shouldExist: false`` removes the account (its home is left in place, noted). SSH keys go to
``~/.ssh/authorized_keys.d/ignition`` (Ignition's fragment), and ``~/.ssh/authorized_keys`` is the
join of that directory, as for cloud-config.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cloudconfig.rootfs import ConfigApplyError, Plan
from cloudconfig.users import lookup_group, lookup_user, plan_key_files

KEYS_NAME = "ignition"
DEFAULT_SHELL = "/bin/bash"


class Tables:
    """The account files of the target root, read through the plan and written back once."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.passwd = self._read("/etc/passwd")
        self.shadow = self._read("/etc/shadow")
        self.group = self._read("/etc/group")
        self.has_gshadow = plan.exists("/etc/gshadow")
        self.gshadow = self._read("/etc/gshadow") if self.has_gshadow else []
        self.changed: set[str] = set()

    def _read(self, path: str) -> list[list[str]]:
        text = self.plan.read_text(path) or ""
        return [ln.split(":") for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    def row(self, table: list[list[str]], name: str) -> list[str] | None:
        return next((r for r in table if r and r[0] == name), None)

    def ids(self, table: list[list[str]]) -> set[int]:
        return {int(r[2]) for r in table if len(r) > 2 and r[2].isdigit()}

    def gid_of(self, name: str) -> int | None:
        r = self.row(self.group, name)
        if r is not None and len(r) > 2 and r[2].isdigit():
            return int(r[2])
        return None

    def write(self, why: str) -> None:
        render = lambda rows: "".join(":".join(r) + "\n" for r in rows).encode()  # noqa: E731
        shadow_gid = lookup_group(self.plan, "shadow") or 0
        if "passwd" in self.changed:
            self.plan.write("/etc/passwd", render(self.passwd), 0o644, why=why)
        if "group" in self.changed:
            self.plan.write("/etc/group", render(self.group), 0o644, why=why)
        if "shadow" in self.changed:
            self.plan.write("/etc/shadow", render(self.shadow), 0o640 if shadow_gid else 0o600, gid=shadow_gid,
                            why=why)
        if "gshadow" in self.changed and self.has_gshadow:
            self.plan.write("/etc/gshadow", render(self.gshadow), 0o640 if shadow_gid else 0o600, gid=shadow_gid,
                            why=why)


def _pad(row: list[str], n: int) -> list[str]:
    while len(row) < n:
        row.append("")
    return row


def _free(used: set[int], system: bool) -> int:
    if system:
        for i in range(999, 99, -1):
            if i not in used:
                return i
        raise ConfigApplyError("no free system id between 100 and 999")
    return max([u for u in used if 1000 <= u < 60000], default=999) + 1


def _today() -> str:
    return str(int(time.time() // 86400))


def plan_groups(tb: Tables, groups: list[dict[str, Any]], notes: list[str]) -> None:
    for g in groups:
        name = g["name"]
        row = tb.row(tb.group, name)
        if g.get("shouldExist") is False:
            if row is not None:
                _delete_group(tb, name)
            continue
        if row is None:
            gids = tb.ids(tb.group)
            gid = g.get("gid")
            if gid is None:
                gid = _free(gids, bool(g.get("system")))
            elif gid in gids:
                raise ConfigApplyError(f"group {name}: gid {gid} is already used in {tb.plan.root}/etc/group")
            pw = g.get("passwordHash") or ""
            tb.group.append([name, "x" if tb.has_gshadow or not pw else pw, str(gid), ""])
            if tb.has_gshadow:
                tb.gshadow.append([name, pw or "!", "", ""])
                tb.changed.add("gshadow")
        else:
            _pad(row, 4)
            if g.get("gid") is not None:
                row[2] = str(g["gid"])
            if g.get("passwordHash"):
                srow = tb.row(tb.gshadow, name) if tb.has_gshadow else None
                if srow is not None:
                    _pad(srow, 4)[1] = g["passwordHash"]
                    tb.changed.add("gshadow")
                else:
                    row[1] = g["passwordHash"]
        tb.changed.add("group")


def _delete_group(tb: Tables, name: str) -> None:
    gid = tb.gid_of(name)
    users = [r[0] for r in tb.passwd if len(r) > 3 and gid is not None and r[3] == str(gid)]
    if users:
        raise ConfigApplyError(f"group {name} cannot be removed (shouldExist: false): it is the primary group of "
                               f"{users[0]}")
    tb.group = [r for r in tb.group if r[0] != name]
    tb.changed.add("group")
    if tb.has_gshadow:
        tb.gshadow = [r for r in tb.gshadow if r[0] != name]
        tb.changed.add("gshadow")


def plan_users(tb: Tables, users: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """Edits the tables; returns the users whose home and keys are planned after the tables are written."""
    homes = []
    for u in users:
        name = u["name"]
        if u.get("shouldExist") is False:
            if tb.row(tb.passwd, name) is not None:
                _delete_user(tb, name, notes)
            continue
        if tb.row(tb.passwd, name) is None:
            _add_user(tb, u)
            if not u.get("noCreateHome"):
                homes.append(u)
        else:
            _modify_user(tb, u, notes)
        if u.get("sshAuthorizedKeys") and u not in homes:
            homes.append(u)
    return homes


def _primary_gid(tb: Tables, u: dict[str, Any], uid: int) -> int:
    name = u["name"]
    if u.get("primaryGroup"):
        gid = tb.gid_of(u["primaryGroup"])
        if gid is None:
            if u["primaryGroup"].isdigit():
                return int(u["primaryGroup"])
            raise ConfigApplyError(f"user {name}: primaryGroup {u['primaryGroup']!r} does not exist in "
                                   f"{tb.plan.root}/etc/group; add it under passwd.groups")
        return gid
    if u.get("noUserGroup"):
        return tb.gid_of("users") or 100
    if tb.row(tb.group, name) is not None:
        raise ConfigApplyError(f"user {name}: a group named {name} already exists; set primaryGroup or "
                               "noUserGroup (useradd refuses the same)")
    gids = tb.ids(tb.group)
    gid = uid if uid not in gids else _free(gids | tb.ids(tb.passwd), bool(u.get("system")))
    tb.group.append([name, "x", str(gid), ""])
    if tb.has_gshadow:
        tb.gshadow.append([name, "!", "", ""])
        tb.changed.add("gshadow")
    tb.changed.add("group")
    return gid


def _add_user(tb: Tables, u: dict[str, Any]) -> None:
    name = u["name"]
    uids = tb.ids(tb.passwd)
    uid = u.get("uid")
    if uid is None:
        uid = _free(uids, bool(u.get("system")))
    elif uid in uids:
        raise ConfigApplyError(f"user {name}: uid {uid} is already used in {tb.plan.root}/etc/passwd")
    gid = _primary_gid(tb, u, uid)
    home = u.get("homeDir") or f"/home/{name}"
    tb.passwd.append([name, "x", str(uid), str(gid), u.get("gecos") or "", home, u.get("shell") or DEFAULT_SHELL])
    tb.shadow.append([name, u.get("passwordHash") or "*", _today(), "0", "99999", "7", "", "", ""])
    tb.changed |= {"passwd", "shadow"}
    _set_groups(tb, name, u.get("groups", []))


def _set_groups(tb: Tables, name: str, groups: list[str]) -> None:
    """usermod -G / useradd -G: exactly these supplementary groups."""
    for g in groups:
        if tb.row(tb.group, g) is None:
            raise ConfigApplyError(f"user {name}: group {g!r} does not exist in {tb.plan.root}/etc/group; add it "
                                   "under passwd.groups or remove it from groups")
    for table, col in ((tb.group, 3), (tb.gshadow, 3)):
        for row in table:
            _pad(row, 4)
            members = [m for m in row[col].split(",") if m]
            want = row[0] in groups
            if want and name not in members:
                members.append(name)
            elif not want and name in members:
                members.remove(name)
            else:
                continue
            row[col] = ",".join(members)
            tb.changed.add("group" if table is tb.group else "gshadow")


def _modify_user(tb: Tables, u: dict[str, Any], notes: list[str]) -> None:
    name = u["name"]
    row = _pad(tb.row(tb.passwd, name) or [], 7)
    before = list(row)
    if u.get("uid") is not None and str(u["uid"]) != row[2]:
        if u["uid"] in tb.ids(tb.passwd):
            raise ConfigApplyError(f"user {name}: uid {u['uid']} is already used in {tb.plan.root}/etc/passwd")
        row[2] = str(u["uid"])
    if u.get("gecos") is not None:
        row[4] = u["gecos"]
    if u.get("homeDir") and u["homeDir"] != row[5]:
        notes.append(f"user {name}: home changed from {row[5]} to {u['homeDir']}; the old home is left in place")
        row[5] = u["homeDir"]
    if u.get("primaryGroup"):
        row[3] = str(_primary_gid(tb, u, int(row[2]) if row[2].isdigit() else 0))
    if u.get("shell"):
        row[6] = u["shell"]
    if row != before:
        tb.changed.add("passwd")
    if u.get("passwordHash") is not None:
        srow = tb.row(tb.shadow, name)
        pw = u["passwordHash"] or "*"
        if srow is None:
            tb.shadow.append([name, pw, _today(), "0", "99999", "7", "", "", ""])
        elif srow[1] != pw:
            _pad(srow, 3)[1] = pw
            srow[2] = _today()
        tb.changed.add("shadow")
    if "groups" in u:
        _set_groups(tb, name, u["groups"])


def _delete_user(tb: Tables, name: str, notes: list[str]) -> None:
    row = tb.row(tb.passwd, name) or []
    tb.passwd = [r for r in tb.passwd if r[0] != name]
    tb.shadow = [r for r in tb.shadow if r[0] != name]
    tb.changed |= {"passwd", "shadow"}
    _set_groups(tb, name, [])
    own = tb.row(tb.group, name)
    if own is not None and len(own) > 2 and len(row) > 3 and own[2] == row[3] and not _pad(own, 4)[3] and \
            not any(len(r) > 3 and r[3] == own[2] for r in tb.passwd):
        _delete_group(tb, name)  # userdel removes the user's own group when nobody else uses it
    if len(row) > 5:
        notes.append(f"user {name} removed; its home {row[5]} is left in place")


def plan_home_and_keys(plan: Plan, u: dict[str, Any], resolve: Callable[[str], str]) -> None:
    """The home of a new user and the keys of any user; paths go through ``resolve`` (symlinks in the root)."""
    acct = lookup_user(plan, u["name"])
    if acct is None:  # pragma: no cover - the tables were just written
        raise ConfigApplyError(f"user {u['name']}: not in {plan.root}/etc/passwd")
    home = resolve(acct.home)
    keys = u.get("sshAuthorizedKeys")
    if (keys or not u.get("noCreateHome")) and not plan.exists(home):
        plan.mkdir(home, 0o700, acct.uid, acct.gid, why=f"home of {u['name']}")
    if not keys:
        return
    text = "\n".join(keys)
    ours = (text if text.endswith("\n") else text + "\n").encode()
    plan_key_files(plan, acct, home, KEYS_NAME, ours, fix_modes=False)  # symlinks below the home are refused
