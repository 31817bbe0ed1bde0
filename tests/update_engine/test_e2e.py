"""End to end on loopback: the real `obelisk update serve`, `obelisk update apply` and the daemon's
--once mode against a GPT disk image file; veritysetup verifies the staged slot."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ue_helpers import APPID, World, run_ue, slot_attrs, slot_bytes, veritysetup_verify

from bootloader import slots
from update_engine import omaha


def _events(served) -> list[tuple]:
    return [(e["eventtype"], e["eventresult"], e["errorcode"], e["previousversion"]) for e in served.events()]


def test_serve_and_apply_stage_slot_b(world: World, serve, ue_argv: list[str], tmp_path: Path) -> None:
    rels = tmp_path / "releases"
    world.publish(rels, world.build("1.0.0", seed=1))
    new = world.build("1.1.0", seed=2)
    world.publish(rels, new)
    srv = serve(rels)
    disk = world.disk(tmp_path / "disk.raw")
    a_before = hashlib.sha256(slot_bytes(disk, 3)).hexdigest()

    # The server answers an Omaha check from a 1.0.0 host with 1.1.0 and serves the payload with Range.
    req = omaha.build_request(omaha.Request(omaha.AppRequest(APPID, "1.0.0", "stable", board="amd64-usr",
                                                             ping=True, updatecheck=True)))
    import requests
    resp = omaha.parse_response(requests.post(srv.url + "/v1/update/", data=req, timeout=5).content)
    assert resp.update.version == "1.1.0" and resp.update.size == new.payload.stat().st_size
    part = requests.get(resp.update.urls[0], headers={"Range": "bytes=10-19"}, timeout=5)
    assert part.status_code == 206 and part.content == new.payload.read_bytes()[10:20]

    r = run_ue(ue_argv, "apply", resp.update.urls[0], "--disk", str(disk), "--key", str(world.pub), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["slot"] == "B" and out["version"] == "1.1.0"
    at = slot_attrs(disk)
    assert at["B"][1:] == (1, False) and at["B"][0] > at["A"][0]  # S=0 T=1, B prioritized
    assert hashlib.sha256(slot_bytes(disk, 3)).hexdigest() == a_before
    veritysetup_verify(disk, 4, new, tmp_path)

    # Applying again onto the same disk: B's trial is pending, so A is still the last good slot and B is
    # staged again (before, the pending trial counted as running and the second apply overwrote A).
    r = run_ue(ue_argv, "apply", str(new.payload), "--disk", str(disk), "--key", str(world.pub))
    assert r.returncode == 0 and "slot B" in r.stdout, r.stdout + r.stderr
    at = slot_attrs(disk)
    assert at["A"][2] and at["B"][1:] == (1, False)
    assert hashlib.sha256(slot_bytes(disk, 3)).hexdigest() == a_before
    # An untrusted key: one clear line, no traceback, nothing changed.
    before = slot_attrs(disk)
    r = run_ue(ue_argv, "apply", str(new.payload), "--disk", str(disk), "--key", str(world.evil_pub))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "trusted key" in r.stderr and slot_attrs(disk) == before


def test_daemon_once_stage_reboot_mark_good(world: World, serve, ue_argv: list[str], host, tmp_path: Path) -> None:
    rels = tmp_path / "releases"
    new = world.build("1.1.0", seed=2)
    world.publish(rels, new)
    srv = serve(rels)
    h = host(srv.url + "/v1/update/")
    a_before = hashlib.sha256(slot_bytes(h.disk, 3)).hexdigest()

    r = run_ue(ue_argv, *h.argv())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "UPDATED_NEED_REBOOT 1.1.0"
    at = slot_attrs(h.disk)
    assert at["B"][1:] == (1, False) and at["B"][0] > at["A"][0]
    assert hashlib.sha256(slot_bytes(h.disk, 3)).hexdigest() == a_before
    veritysetup_verify(h.disk, 4, new, tmp_path)
    assert _events(srv) == [(3, 2, None, "0.0.0.0"), (13, 1, None, None), (14, 1, None, None), (3, 1, None, None)]

    st = run_ue(ue_argv, "status", "--json", "--state-dir", str(h.state), "--socket", str(h.root / "none.sock"))
    s = json.loads(st.stdout)
    assert s["state"] == "UPDATED_NEED_REBOOT" and s["new_version"] == "1.1.0" and s["progress"] == 1.0
    assert s["current_version"] == "1.0.0" and s["last_checked"] > 0 and s["last_error"] is None

    # Same boot again: only a ping, nothing re-staged.
    assert run_ue(ue_argv, *h.argv()).returncode == 0
    assert len(_events(srv)) == 4

    # "Reboot" into B: a health hook runs, the slot is marked good, 3/2 carries the previous version.
    (h.root / "health.d").mkdir()
    hook = h.root / "health.d/10-ok"
    hook.write_text(f"#!/bin/sh\ntouch {h.root}/hook-ran\n")
    hook.chmod(0o755)
    h.set_version("1.1.0")
    h.reboot()
    r = run_ue(ue_argv, *h.argv())
    assert r.returncode == 0, r.stderr
    assert (h.root / "hook-ran").exists()
    assert slot_attrs(h.disk)["B"][1:] == (0, True)
    assert _events(srv)[-1] == (3, 2, None, "1.0.0")


def test_rollback_reported_and_version_skipped(world: World, serve, ue_argv: list[str], host,
                                               tmp_path: Path) -> None:
    rels = tmp_path / "releases"
    world.publish(rels, world.build("1.1.0", seed=2))
    srv = serve(rels)
    h = host(srv.url + "/v1/update/")
    assert run_ue(ue_argv, *h.argv()).returncode == 0
    # The trial boot of B failed and the boot loader fell back: still 1.0.0 after a reboot. GRUB's gptprio
    # would have used B's try; do the same here, as no boot loader runs in this test.
    slots.set_attrs(h.disk, slots.USR_B, tries=0)
    # What the trial's boot check left on ROOT before the fallback (images/.../obelisk-boot-check).
    (h.state / "trial-failure").write_text("time=1796000000\nslot=B\nversion=1.1.0\nreason=health hook "
                                           "50-app failed (exit 1): <b>db\x1b[31m down</b>\n")
    h.reboot()
    r = run_ue(ue_argv, *h.argv())
    assert r.returncode == 0, r.stderr
    ev = _events(srv)
    assert (3, 0, 44, None) in ev
    sent = next(e for e in srv.events() if e["errorcode"] == 44)
    assert sent["reason"] == "trial of 1.1.0 on slot B failed: health hook 50-app failed (exit 1): <b>db [31m down</b>"
    assert not (h.state / "trial-failure").exists() and (h.state / "trial-failure.sent").exists()  # not sent twice
    assert ev.count((13, 1, None, None)) == 1  # 1.1.0 was not downloaded again
    st = json.loads(run_ue(ue_argv, "status", "--json", "--state-dir", str(h.state), "--socket",
                           str(h.root / "x.sock")).stdout)
    assert st["failed_versions"] == ["1.1.0"] and "rolled back" in st["last_error"]
    assert st["rollback_reason"] == sent["reason"]  # kept for `update status` after it was sent
    # A newer release is taken.
    world.publish(rels, world.build("1.2.0", seed=3))
    r = run_ue(ue_argv, *h.argv())
    assert r.returncode == 0 and r.stdout.strip() == "UPDATED_NEED_REBOOT 1.2.0", r.stderr
