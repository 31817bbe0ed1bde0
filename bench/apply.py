"""Payload apply throughput vs `curl | dd` of the same bytes, and the apply's peak RSS.

Both fetch the same payload from the same `obelisk update serve` on loopback and write it into slot
B of the same disk image file with an fsync at the end: the baseline is `curl URL | dd conv=fsync`,
ours is `obelisk update apply URL --disk ...` in a child process (its peak RSS is that child's
ru_maxrss). Ours also checks the signature, every chunk's SHA-256, re-reads the whole slot and sets
the GPT attributes; the ratio (ours/baseline throughput, goal >= 0.9) counts all of that, and the
stream-only figure (without the re-read) is printed too.

    python -m bench apply [--size-mib 1024] [--tmpfs] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from bootloader import gpt, slots
from builder.tools import require
from update_engine import payload, signing

MiB = 1 << 20


def _make(work: Path, size: int) -> tuple[Path, Path, Path]:
    """Release dir with a payload of a random `size`-byte USR image; a sparse disk with room in slot B."""
    signing.generate_keypair(work / "keys")
    usr = work / "usr.img"
    with open(usr, "wb") as f:
        left = size
        while left:
            n = min(16 * MiB, left)
            f.write(os.urandom(n))
            left -= n
    rel = work / "releases/bench/2.0.0"
    rel.mkdir(parents=True)
    m = payload.write_payload(usr, rel / "update.payload", app_id="{bench}", arch="amd64", version="2.0.0",
                              verity_root_hash="ab" * 32, hash_offset=size - 4096 if size > 4096 else 0,
                              private_key=signing.load_private_key(work / "keys/obelisk.key"))
    usr.unlink()
    import hashlib
    h = hashlib.sha256()
    with open(rel / "update.payload", "rb") as f:
        while chunk := f.read(16 * MiB):
            h.update(chunk)
    (rel / "release.json").write_text(json.dumps({
        "name": "bench", "version": "2.0.0", "app_id": "{bench}", "arch": "amd64",
        "artifacts": {"update.payload": {"size": m.payload_size, "sha256": h.hexdigest()}}}))
    slot_lba = (size + 8 * MiB) // 512
    disk = work / "disk.raw"
    a_first = 2048
    b_first = a_first + slot_lba
    gpt.create_table(disk, (b_first + slot_lba + 2048) * 512, [
        gpt.PartitionSpec(3, "USR-A", slots.USR_TYPE, slots.USR_A_UUID, a_first, slot_lba, (1 << 48) | (1 << 56)),
        gpt.PartitionSpec(4, "USR-B", slots.USR_TYPE, slots.USR_B_UUID, b_first, slot_lba, 0),
    ], uuid.UUID(int=1))
    return rel / "update.payload", disk, work / "keys/obelisk.pub"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _baseline(url: str, disk: Path, offset: int) -> float:
    curl, dd = require("curl"), require("dd")
    t = time.perf_counter()
    c = subprocess.Popen([curl, "-sf", url], stdout=subprocess.PIPE)
    d = subprocess.run([dd, f"of={disk}", "bs=1M", "iflag=fullblock", "oflag=seek_bytes", f"seek={offset}",
                        "conv=notrunc,fsync", "status=none"], stdin=c.stdout, check=True)
    assert c.stdout is not None
    c.stdout.close()
    if c.wait() != 0 or d.returncode != 0:
        raise RuntimeError("curl | dd failed")
    return time.perf_counter() - t


def _ours(url: str, disk: Path, key: Path) -> tuple[float, int, dict]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "update_engine.cli", "apply", url, "--disk", str(disk), "--key",
                        str(key), "--json"], capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB; max over children so far
    return elapsed, max(rss, before), json.loads(r.stdout)


def _stream_only(url: str, disk: Path, key: Path) -> float:
    """In-process apply timed up to the start of the re-read (download + checks + write + fsync)."""
    from update_engine.apply import Applier

    marks: dict[str, float] = {}
    a = Applier(url, disk, [signing.load_public_key(key)],
                on_phase=lambda ph: marks.setdefault(ph, time.perf_counter()))
    t = time.perf_counter()
    a.run()
    return marks["verifying"] - t


def _reset(disk: Path) -> None:
    slots.set_attrs(disk, slots.USR_B, priority=0, tries=0, successful=False)
    slots.set_attrs(disk, slots.USR_A, priority=1, tries=0, successful=True)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench apply")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tmpfs", action="store_true", help="work in /dev/shm instead of the disk-backed temp dir")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    base = "/dev/shm" if args.tmpfs else None
    work = Path(tempfile.mkdtemp(prefix="obelisk-bench-apply-", dir=base))
    proc = None
    try:
        pl, disk, key = _make(work, size)
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "update_engine.cli", "serve", str(work / "releases"),
                                 "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1/payloads/bench/2.0.0/update.payload"
        for _ in range(200):
            try:
                requests.head(url, timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.05)
        b_off, _ = slots.slot_extent(disk, slots.USR_B)
        nbytes = pl.stat().st_size
        where = "tmpfs (/dev/shm)" if args.tmpfs else f"disk-backed temp dir {work.parent} (sparse disk image)"
        print(f"payload {nbytes / MiB:.0f} MiB, files in {where}, {args.rounds} round(s), best of each")
        base_t, ours_t, stream_t, rss = [], [], [], 0
        for _ in range(args.rounds):
            base_t.append(_baseline(url, disk, b_off))
            _reset(disk)
            t, r, _ = _ours(url, disk, key)
            ours_t.append(t)
            rss = max(rss, r)
            _reset(disk)
            stream_t.append(_stream_only(url, disk, key))
            _reset(disk)
        b, o, s = min(base_t), min(ours_t), min(stream_t)
        mbps = lambda secs: nbytes / MiB / secs  # noqa: E731
        print(f"baseline curl | dd conv=fsync : {mbps(b):8.1f} MiB/s ({b:.2f} s)")
        print(f"obelisk update apply (all)    : {mbps(o):8.1f} MiB/s ({o:.2f} s; incl. re-read verify + GPT)")
        print(f"apply stream phase only       : {mbps(s):8.1f} MiB/s ({s:.2f} s; fetch, check, write, fsync)")
        print(f"ratio apply/baseline          : {b / o:.2f} (goal >= 0.9)")
        print(f"ratio stream/baseline         : {b / s:.2f}")
        print(f"peak RSS of the apply process : {rss / 1024:.1f} MiB (goal < 100 MiB)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
