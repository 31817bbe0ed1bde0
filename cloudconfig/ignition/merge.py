"""Ignition's merge of a child config into its parent (coreos/ignition config/merge/merge.go).

The rules, on configs in the 3.4.0 shape (both sides already validated):
- objects merge field by field; a scalar that is a Go pointer (most optional fields) is replaced
  only when the child sets it, a non-pointer scalar (the keys: path, name, device, version) is
  always the child's;
- an object is taken whole from the side that has it when the other side leaves it empty;
- a list whose entries are appended (a file's ``append``, filesystem/RAID/LUKS ``options``) is the
  parent's entries then the child's;
- any other list is merged by key (``path`` for files, directories and links, which share one key
  space; ``name`` for units, drop-ins, users, groups and headers; ``source`` for configs and CAs;
  the value itself for lists of strings): an entry with the same key in the same list is merged,
  one whose key the child uses in a sibling list (a file that became a link) is dropped, the rest
  of the parent's are kept in order and the child's new entries follow. A child HTTP header
  without a value removes the parent's header of that name.
"""

from __future__ import annotations

from typing import Any

from cloudconfig.ignition.spec import SCHEMA, T


def merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The merged config; neither input is modified."""
    return _obj(parent, child, SCHEMA)


def _zero(value: Any, t: T) -> bool:
    if value is None:
        return True
    if t.kind == "obj":
        return all(_zero(value.get(n), f.t) if not (f.t.kind in ("str", "int", "bool") and f.ptr) else
                   value.get(n) is None for n, f in t.fields.items())
    if t.kind == "list":
        return not value
    return value in ("", 0, False)


def _obj(parent: dict[str, Any], child: dict[str, Any], t: T) -> dict[str, Any]:
    out: dict[str, Any] = {}
    child_keys = _child_keys(child, t)
    for name, f in t.fields.items():
        p, c = parent.get(name), child.get(name)
        if f.t.kind in ("str", "int", "bool"):
            v = (c if c is not None else p) if f.ptr else c
        elif f.t.kind == "obj":
            if _zero(c, f.t):
                v = p
            elif _zero(p, f.t):
                v = c
            else:
                v = _obj(p, c, f.t)
        elif f.ignore_dups:
            v = [*(p or []), *(c or [])] or None
        else:
            v = _list(name, p or [], c or [], f.t, t, child_keys) or None
        if v is not None:
            out[name] = v
    return out


def _key(item: Any, lt: T) -> str:
    """The merge key of a list entry (``lt`` is the list's type)."""
    return lt.key(item) if lt.key is not None else str(item)


def _child_keys(child: dict[str, Any], t: T) -> dict[tuple[str, str], tuple[str, Any]]:
    """(key space, key) -> (list name, entry) over the child's keyed lists (last entry wins)."""
    keys: dict[tuple[str, str], tuple[str, Any]] = {}
    for name, f in t.fields.items():
        if f.t.kind != "list" or f.ignore_dups:
            continue
        for item in child.get(name) or []:
            keys[(t.handles.get(name, name), _key(item, f.t))] = (name, item)
    return keys


def _list(name: str, parent: list[Any], child: list[Any], lt: T, owner: T,
          child_keys: dict[tuple[str, str], tuple[str, Any]]) -> list[Any]:
    it = lt.item
    assert it is not None
    space = owner.handles.get(name, name)
    out: list[Any] = []
    parent_keys = set()
    for p in parent:
        k = _key(p, lt)
        parent_keys.add(k)
        hit = child_keys.get((space, k))
        if hit is None:
            out.append(p)
            continue
        in_list, c = hit
        if in_list != name:
            continue  # the child has this key in a sibling list: its entry there wins
        if it.kind == "obj":
            if name == "httpHeaders" and c.get("value") is None:
                continue  # a header without a value removes the parent's header
            out.append(_obj(p, c, it))
        else:
            out.append(c)
    out += [c for c in child if _key(c, lt) not in parent_keys]
    return out
