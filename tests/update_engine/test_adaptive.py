"""Adaptive updates on disk images: chunks the disk has are copied (verified first), the rest fetched by
Range from the real `obelisk update serve` or a plain static server that records what it sent; hostile
servers and damaged sources are recovered from (the full payload) or refused, the slot kept intact."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ue_helpers import APPID, ARCH, CHUNK, Built, World, slot_attrs, slot_bytes, veritysetup_verify

from bootloader import slots
from obelisk import diskio, signing
from obelisk.signing import load_public_key
from obelisk.tools import run
from update_engine import apply as applymod
from update_engine import chunkplan, payload
from update_engine.chunks import Chunker
from update_engine.errors import ApplyError

CK = Chunker.for_average(16 * 1024)  # ~100 chunks in the 1.6 MiB test images
BASE_BLOB = 1  # the seed of 1.0.0's lib/blob (ue_helpers' world): related releases keep it


def make_related(world: World, version: str, files: dict[str, bytes], *, verity_uuid: str | None = None) -> Built:
    """A release of the same tree as world's 1.0.0 (same blob) with ``files`` added or changed."""
    tag = f"adaptive-{version}-{hashlib.sha256(repr((sorted(files), verity_uuid)).encode()).hexdigest()[:6]}"
    if tag in world.builds:
        return world.builds[tag]
    work = world.dir / "builds" / tag
    tree = work / "tree"
    (tree / "share/obelisk").mkdir(parents=True)
    (tree / "share/obelisk/release").write_text(f"VERSION={version}\nAPPID={APPID}\nARCH={ARCH}\n")
    (tree / "lib").mkdir()
    (tree / "lib/blob").write_bytes(random.Random(BASE_BLOB).randbytes(1536 * 1024))
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    img = work / "usr.img"
    run(["mksquashfs", tree, img, "-comp", "gzip", "-noappend", "-all-root", "-no-progress", "-quiet",
         "-mkfs-time", "0", "-all-time", "0"])
    hoff = -(-img.stat().st_size // 4096) * 4096
    with open(img, "r+b") as f:
        f.truncate(hoff)
    res = run(["veritysetup", "format", img, img, f"--hash-offset={hoff}", f"--data-blocks={hoff // 4096}",
               "--salt=" + "00" * 32, "--uuid=" + str(uuid.UUID(int=7))])
    root = next(ln.split(":", 1)[1].strip() for ln in res.stdout.splitlines() if ln.startswith("Root hash"))
    out = work / "update.payload"
    m = payload.write_payload(img, out, app_id=APPID, arch=ARCH, version=version, verity_root_hash=root,
                              hash_offset=hoff, private_key=world.priv, chunk_size=CHUNK, chunker=CK,
                              verity_salt="00" * 32, verity_uuid=verity_uuid or str(uuid.UUID(int=7)))
    b = Built(version, img, out, root, hoff, m)
    world.builds[tag] = b
    return b


def small_change(world: World) -> Built:
    return make_related(world, "1.1.0", {"share/note": b"a small file\n"})


def keys(world: World) -> list:
    return [load_public_key(world.pub)]


def applier(world: World, source: str, disk: Path, state: Path | None = None, **kw) -> applymod.Applier:
    notes: list[str] = []
    a = applymod.Applier(source, disk, keys(world), state_dir=state, adaptive=True, on_note=notes.append, **kw)
    a.notes = notes  # type: ignore[attr-defined]
    return a


def check_staged(disk: Path, new: Built, a_before: bytes, tmp: Path) -> None:
    size = new.usr.stat().st_size
    assert slot_bytes(disk, 4)[:size] == new.usr.read_bytes()
    assert slot_bytes(disk, 3) == a_before  # the running slot is never written
    assert slot_attrs(disk)["B"][1:] == (1, False)
    veritysetup_verify(disk, 4, new, tmp)


# ---------------------------------------------------------------- a plain static server (one range per GET)


class Static:
    """Serves files with single-range GETs; counts the body bytes it sent; ``mode`` makes it misbehave."""

    def __init__(self, root: Path) -> None:
        self.root, self.mode, self.sent, self.gets = root, "ok", 0, []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                data = (outer.root / self.path.lstrip("/")).read_bytes()
                rng = self.headers.get("Range")
                outer.gets.append(rng)
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
                mode = outer.mode
                if not m or mode == "ignore-range":
                    return self._send(200, data, {})
                a = int(m[1])
                b = int(m[2]) if m[2] else len(data) - 1
                body = data[a:b + 1]
                hdr = {"Content-Range": f"bytes {a}-{b}/{len(data)}"}
                if mode == "wrong-bytes" and a > 1000:
                    body = bytes(x ^ 1 for x in body)
                elif mode == "short" and a > 1000:
                    body = body[: len(body) // 2]
                    hdr = {"Content-Range": f"bytes {a}-{a + len(body) - 1}/{len(data)}"}
                elif mode == "overlap" and a > 1000:
                    body = data[a - 100:b + 1]
                    hdr = {"Content-Range": f"bytes {a - 100}-{b}/{len(data)}"}
                elif mode == "multipart" and a > 1000:
                    body = (b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes "
                            + f"{a}-{b}/{len(data)}".encode() + b"\r\n\r\n" + body + b"\r\n--XX--\r\n")
                    hdr = {"Content-Type": "multipart/byteranges; boundary=XX"}
                self._send(206, body, hdr)

            def _send(self, code: int, body: bytes, hdr: dict) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                for k, v in hdr.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                    outer.sent += len(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def static(tmp_path: Path):
    root = tmp_path / "static"
    root.mkdir()
    s = Static(root)
    yield s
    s.close()


def publish(static: Static, b: Built) -> str:
    (static.root / f"{b.version}.payload").write_bytes(b.payload.read_bytes())
    return f"{static.url}/{b.version}.payload"


# ---------------------------------------------------------------- the planner


def test_plan_reuses_the_running_slot_and_coalesces(world: World, tmp_path: Path) -> None:
    new = small_change(world)
    old = world.builds["1.0.0"]
    fd = os.open(old.usr, os.O_RDONLY)
    try:
        src = chunkplan.LocalSource("old", fd, 0, old.usr.stat().st_size)
        plan = chunkplan.make_plan(new.manifest, [src])
    finally:
        os.close(fd)
    assert plan.reused + plan.fetched + plan.rebuilt == new.manifest.target_size
    assert plan.rebuilt == new.manifest.target_size - new.manifest.hash_offset  # the whole verity area
    assert plan.worth_it and plan.fetched < 0.3 * plan.total
    fetches = [i for i in plan.items if isinstance(i, chunkplan.Fetch)]
    assert plan.requests == len(fetches) < sum(len(f.chunks) for f in fetches) + 1
    for a, b in zip(plan.items, plan.items[1:], strict=False):  # adjacent fetches are one request
        assert not (isinstance(a, chunkplan.Fetch) and isinstance(b, chunkplan.Fetch)
                    and a.offset + a.length == b.offset and a.length + b.length <= chunkplan.MAX_RANGE)


def test_image_size_of_a_slot(world: World, tmp_path: Path) -> None:
    disk = world.disk(tmp_path / "disk.raw")
    off, length = slots.slot_extent(disk, 3)
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert chunkplan.image_size(fd, off, length) == world.builds["1.0.0"].usr.stat().st_size
        assert chunkplan.image_size(fd, *slots.slot_extent(disk, 4)) is None  # never written
    finally:
        os.close(fd)


def test_image_diff_cli(world: World, tmp_path: Path, obelisk_bin: str) -> None:
    new = small_change(world)
    old = world.builds["1.0.0"]
    res = run([obelisk_bin, "image", "diff", str(old.payload), str(new.payload), "--json"])
    doc = json.loads(res.stdout)
    assert doc["reused"] > 0.7 * doc["target_bytes"] and doc["adaptive"]
    assert doc["reused"] + doc["fetched"] + doc["rebuilt"] == doc["target_bytes"]
    import subprocess
    bad = subprocess.run([obelisk_bin, "image", "diff", str(tmp_path), str(new.payload)], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1


# ---------------------------------------------------------------- apply with reuse


def test_apply_file_reuses_running_slot(world: World, tmp_path: Path) -> None:
    new = small_change(world)
    disk = world.disk(tmp_path / "disk.raw")
    a_before = slot_bytes(disk, 3)
    r = applier(world, str(new.payload), disk, tmp_path / "state").run()
    t = r.transfer
    assert t["mode"] == "adaptive" and t["reused"] > 0.7 * t["total"]
    assert t["reused"] + t["fetched"] + t["rebuilt"] == t["total"]
    assert t["by_source"].get("slot A", 0) == t["reused"]
    check_staged(disk, new, a_before, tmp_path)
    assert (tmp_path / "state" / chunkplan.INDEX_FILE.format(index=4)).exists()  # kept for the next update


def test_verity_tree_rebuilt_on_the_host(world: World, tmp_path: Path) -> None:
    new = small_change(world)
    disk = world.disk(tmp_path / "disk.raw")
    a_before = slot_bytes(disk, 3)
    r = applier(world, str(new.payload), disk).run()
    assert r.transfer["rebuilt"] > 0
    check_staged(disk, new, a_before, tmp_path)
    # A manifest whose uuid does not match the tree it indexes: the rebuilt chunk fails its hash, is fetched.
    odd = make_related(world, "1.1.0", {"share/note": b"a small file\n"}, verity_uuid=str(uuid.UUID(int=8)))
    disk2 = world.disk(tmp_path / "disk2.raw")
    r2 = applier(world, str(odd.payload), disk2).run()
    assert r2.transfer["mode"] == "adaptive"
    check_staged(disk2, odd, a_before, tmp_path)


def test_apply_through_update_serve(world: World, tmp_path: Path, serve) -> None:
    new = small_change(world)
    releases = tmp_path / "releases"
    world.publish(releases, new)
    srv = serve(releases)
    disk = world.disk(tmp_path / "disk.raw")
    a_before = slot_bytes(disk, 3)
    url = f"{srv.url}/v1/payloads/tiny/{new.version}/update.payload"
    a = applier(world, url, disk)
    r = a.run()
    assert r.transfer["mode"] == "adaptive", a.notes
    assert r.transfer["fetched"] < 0.3 * r.transfer["total"]
    check_staged(disk, new, a_before, tmp_path)


def test_apply_static_server_records_fewer_bytes(world: World, tmp_path: Path, static: Static) -> None:
    new = make_related(world, "1.2.0", {"lib/pkg": random.Random(9).randbytes(120 * 1024)})  # a package-sized file
    url = publish(static, new)
    disk = world.disk(tmp_path / "disk.raw")
    a_before = slot_bytes(disk, 3)
    r = applier(world, url, disk).run()
    full = new.payload.stat().st_size
    assert r.transfer["mode"] == "adaptive"
    # What the server sent: the header + manifest + the fetched ranges, nothing else.
    assert static.sent == new.manifest.data_offset + r.transfer["fetched"]
    assert static.sent < 0.3 * full
    check_staged(disk, new, a_before, tmp_path)


def test_reuse_from_both_slots(world: World, tmp_path: Path) -> None:
    """Slot B holds a pending 1.1.0 with a file slot A lacks: 1.2.0 has that file too and takes it from B."""
    extra = {"lib/x": random.Random(11).randbytes(200 * 1024)}
    mid = make_related(world, "1.1.0", extra)
    new = make_related(world, "1.2.0", {**extra, "share/note": b"changed\n"})
    disk = world.disk(tmp_path / "disk.raw")
    applymod.Applier(str(mid.payload), disk, keys(world)).run()  # the full path stages 1.1.0 into B
    a_before = slot_bytes(disk, 3)
    r = applier(world, str(new.payload), disk).run()
    t = r.transfer
    assert t["by_source"].get("slot B (being written)", 0) > 100 * 1024, t
    assert t["fetched"] < 0.2 * t["total"]
    check_staged(disk, new, a_before, tmp_path)


def test_unrelated_payload_falls_back_to_full(world: World, tmp_path: Path) -> None:
    new = world.build("1.1.0", seed=2)  # another blob: nothing to reuse
    disk = world.disk(tmp_path / "disk.raw")
    a_before = slot_bytes(disk, 3)
    a = applier(world, str(new.payload), disk)
    r = a.run()
    assert r.transfer["mode"] == "full"
    assert any("downloading the whole payload" in n for n in a.notes)
    check_staged(disk, new, a_before, tmp_path)


def test_damaged_source_chunks_are_fetched_never_written(world: World, tmp_path: Path, static: Static) -> None:
    """Slot A's saved index (kept since it was staged) no longer matches its bytes: those chunks fail their
    hash when read, are fetched instead, and slot A is never written."""
    new = small_change(world)
    url = publish(static, new)
    disk = world.disk(tmp_path / "disk.raw")
    state = tmp_path / "state"
    off, length = slots.slot_extent(disk, 3)
    fd = os.open(disk, os.O_RDONLY)
    try:
        idx = CK.index_fd(fd, off, chunkplan.image_size(fd, off, length))
    finally:
        os.close(fd)
    state.mkdir()
    (state / chunkplan.INDEX_FILE.format(index=3)).write_text(json.dumps(
        {"chunker": CK.to_json(), "chunks": [[c.length, c.sha256] for c in idx]}))
    with open(disk, "r+b") as f:  # then damage slot A in the middle of its blob
        f.seek(off + 700_000)
        f.write(b"\xff" * 5000)
    a_before = slot_bytes(disk, 3)
    r = applier(world, url, disk, state).run()
    assert r.transfer["mode"] == "adaptive" and r.transfer["damaged"] > 0
    check_staged(disk, new, a_before, tmp_path)


@pytest.mark.parametrize("mode", ["ignore-range", "wrong-bytes", "short", "overlap", "multipart"])
def test_hostile_range_answers_fall_back_to_full(world: World, tmp_path: Path, static: Static, mode: str) -> None:
    new = small_change(world)
    url = publish(static, new)
    static.mode = mode
    disk = world.disk(tmp_path / "disk.raw")
    a_before = slot_bytes(disk, 3)
    a = applier(world, url, disk)
    r = a.run()
    assert r.transfer["mode"] == "full", (mode, a.notes)
    assert any("whole payload" in n for n in a.notes), a.notes
    assert None in static.gets  # the last GET read the payload front to back, without Range
    check_staged(disk, new, a_before, tmp_path)


def test_index_not_covering_target_is_refused(world: World, tmp_path: Path) -> None:
    new = small_change(world)
    obj = json.loads(payload.canonical_json(new.manifest.to_json()))
    obj["index"]["chunks"] = obj["index"]["chunks"][:-1]
    blob = payload.canonical_json(obj)
    head = payload.HEADER.pack(payload.MAGIC, payload.FORMAT_VERSION, len(blob), payload.SIGNATURE_SIZE, 0)
    sig = signing.sign(world.priv, head + blob)
    bad = tmp_path / "bad.payload"
    bad.write_bytes(head + blob + sig + new.usr.read_bytes())
    disk = world.disk(tmp_path / "disk.raw")
    before = disk.read_bytes()
    with pytest.raises(ApplyError, match="does not cover the target"):
        applier(world, str(bad), disk).run()
    assert disk.read_bytes() == before  # refused before anything was written


def test_sigkill_during_chunked_apply_resumes_to_same_bytes(world: World, tmp_path: Path) -> None:
    new = make_related(world, "1.2.0", {"lib/pkg": random.Random(9).randbytes(120 * 1024)})
    disk = world.disk(tmp_path / "disk.raw")
    state = tmp_path / "state"
    a_before = slot_bytes(disk, 3)
    rng = random.Random(5)
    kills = 0
    for _ in range(3):
        at = rng.randint(1, 4)
        pid = os.fork()
        if pid == 0:  # child: no pytest from here on
            try:
                count = [0]
                orig = diskio.pwrite_all

                def dying(fd, data, offset, count=count, at=at, orig=orig):
                    count[0] += 1
                    if count[0] == at:
                        orig(fd, bytes(data)[: len(data) // 2], offset)  # a torn write, then the cut
                        os.kill(os.getpid(), signal.SIGKILL)
                    orig(fd, data, offset)

                diskio.pwrite_all = dying
                applier(world, str(new.payload), disk, state).run()
                os._exit(0)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0
        kills += os.WIFSIGNALED(status)
        assert slot_bytes(disk, 3) == a_before
        assert slot_attrs(disk)["B"][0] == 0 or not os.WIFSIGNALED(status)  # a cut slot never boots
    assert kills >= 2
    r = applier(world, str(new.payload), disk, state).run()
    assert r.transfer["mode"] == "adaptive"
    check_staged(disk, new, a_before, tmp_path)
