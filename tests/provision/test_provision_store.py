"""The store's cached view of the groups folder follows every kind of change (no server needed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prov_helpers import copy_example

from provision.select import labels_from_query, select
from provision.store import RECHECK_SECONDS, Store


def _winner(store: Store, mac: str) -> str:
    return select(store.groups(), labels_from_query([("mac", mac)])).id


def _age(path: Path, seconds: float = 3600) -> None:
    """Make files look old, so the store caches them (it never trusts a file changed just now)."""
    t = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t), follow_symlinks=False)


def test_groups_follow_renames_in_place_edits_and_deletes(tmp_path: Path) -> None:
    data = copy_example(tmp_path / "data")
    _age(data)
    store = Store(data)
    mac = "52:54:00:12:34:56"
    assert _winner(store, mac) == "node1"
    assert store.groups() is store.groups()  # cached: the same object while nothing changed

    # Another process adds a more specific group the way writers do: temporary file, rename.
    node = json.loads((data / "groups/node1.json").read_text())
    more = {**node, "id": "node1-installed", "selector": {"mac": mac, "os": "installed"}}
    tmp = data / "groups/.x.tmp"
    tmp.write_text(json.dumps(more))
    os.replace(tmp, data / "groups/node1-installed.json")
    assert select(store.groups(), labels_from_query([("mac", mac), ("os", "installed")])).id == "node1-installed"

    # An editor rewrites node1 in place (same inode, same size), with an old time stamp even.
    _age(data)
    assert _winner(store, mac) == "node1"
    path = data / "groups/node1.json"
    text = path.read_text()
    edited = text.replace('"mac": "52:54:00:12:34:56"', '"mac": "52:54:00:12:34:57"')
    assert len(edited) == len(text)
    with open(path, "r+") as f:
        f.write(edited)
    _age(path, 7200)
    time.sleep(RECHECK_SECONDS + 0.1)
    assert _winner(store, mac) == "default"
    assert _winner(store, "52:54:00:12:34:57") == "node1"

    # A delete shows at once (the folder's stamp changes).
    (data / "groups/node1.json").unlink()
    assert _winner(store, "52:54:00:12:34:57") == "default"


def test_own_writes_show_at_once(tmp_path: Path) -> None:
    data = copy_example(tmp_path / "data")
    _age(data)
    store = Store(data)
    assert _winner(store, "aa:bb:cc:dd:ee:ff") == "default"
    g = store.group("node1").model_copy(update={"id": "other", "selector": {"mac": "aa:bb:cc:dd:ee:ff"}})
    store.put_group(g)
    assert _winner(store, "aa:bb:cc:dd:ee:ff") == "other"
    store.delete_group("other")
    assert _winner(store, "aa:bb:cc:dd:ee:ff") == "default"
