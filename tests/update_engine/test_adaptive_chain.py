"""Adaptive updates across releases and through the user's surfaces: the saved slot index serves the next
update, `obelisk update apply --adaptive` prints and returns the figures, the status socket shows them."""

from __future__ import annotations

import json
import random
import subprocess
import threading
from pathlib import Path

from test_adaptive import applier, check_staged, make_related, small_change
from ue_helpers import World, slot_bytes

from bootloader import slots
from update_engine import adaptive, chunkplan
from update_engine.chunks import Chunker
from update_engine.status_socket import StatusServer, ask


def test_saved_index_serves_the_next_update(world: World, tmp_path: Path, monkeypatch) -> None:
    """1.1.0 staged into B (its index saved), B marked good and running; 1.2.0 goes to A, planned from B's
    saved index without indexing B again."""
    state = tmp_path / "state"
    extra = {"lib/x": random.Random(12).randbytes(150 * 1024)}
    mid = make_related(world, "1.1.0", extra)
    new = make_related(world, "1.2.0", {**extra, "share/note": b"next\n"})
    disk = world.disk(tmp_path / "disk.raw")
    applier(world, str(mid.payload), disk, state).run()
    assert (state / chunkplan.INDEX_FILE.format(index=4)).exists()
    slots.mark_good(disk, 4)  # B booted fine: it is the slot to keep now; A is written next
    b_before = slot_bytes(disk, 4)
    indexed: list[int] = []
    orig = Chunker.index_fd
    monkeypatch.setattr(Chunker, "index_fd", lambda self, fd, off, size, split=0: indexed.append(off)
                        or orig(self, fd, off, size, split))
    r = applier(world, str(new.payload), disk, state).run()
    assert r.slot == "A"
    b_off, _ = slots.slot_extent(disk, 4)
    assert b_off not in indexed  # B's chunks came from its saved index
    # A's old 1.0.0 bytes that are already in place stay; the file 1.0.0 lacked comes from B's saved index.
    assert r.transfer["by_source"].get("slot B", 0) > 100 * 1024, r.transfer
    assert r.transfer["reused"] > 0.9 * r.transfer["total"]
    assert slot_bytes(disk, 4) == b_before
    size = new.usr.stat().st_size
    assert slot_bytes(disk, 3)[:size] == new.usr.read_bytes()
    assert (state / chunkplan.INDEX_FILE.format(index=4)).exists()  # B is unchanged: its index stays
    assert (state / chunkplan.INDEX_FILE.format(index=3)).exists()


def test_update_apply_adaptive_cli(world: World, tmp_path: Path, ue_argv: list[str]) -> None:
    new = small_change(world)
    disk = world.disk(tmp_path / "disk.raw")
    a_before = slot_bytes(disk, 3)
    res = subprocess.run([*ue_argv, "apply", str(new.payload), "--disk", str(disk), "--key", str(world.pub),
                          "--adaptive", "--newer-than", "1.0.0", "--app-id", new.manifest.app_id,
                          "--arch", new.manifest.arch], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "adaptive: reused" in res.stdout and "saved" in res.stdout
    check_staged(disk, new, a_before, tmp_path)
    disk2 = world.disk(tmp_path / "disk2.raw")
    res = subprocess.run([*ue_argv, "apply", str(new.payload), "--disk", str(disk2), "--key", str(world.pub),
                          "--adaptive", "--json", "--newer-than", "1.0.0"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    t = json.loads(res.stdout)["transfer"]
    assert t["mode"] == "adaptive" and t["saved"] > 0.7 * t["total"]


def test_status_socket_shows_transfer_figures(tmp_path: Path) -> None:
    class Backend:
        def status(self) -> dict:
            return {"state": "DOWNLOADING"}

        def request_check(self) -> None:
            pass

    path = tmp_path / "update.sock"
    srv = StatusServer(path, Backend())
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert "transfer" not in ask(path, "status")  # nothing applied since this server started
        adaptive.publish(adaptive.Figures(total=100, reused=90, fetched=10))
        st = ask(path, "status")
        assert st["transfer"]["reused"] == 90 and st["transfer"]["saved"] == 90 and st["state"] == "DOWNLOADING"
    finally:
        srv.shutdown()
        srv.server_close()
