"""Payload apply throughput vs `curl | dd` of the same bytes, and the apply's peak RSS.

Everything fetches the same payload from the same `obelisk update serve` on loopback and writes it into
slot B of the same disk image file with an fsync at the end. Baselines: `curl URL | dd conv=fsync` (no
hashing, no re-read: the issue's yardstick), and the same followed by a SHA-256 of the written bytes read
back (`dd | openssl dgst -sha256`, or coreutils `sha256sum` when openssl is missing): a copy-then-verify
pipeline made of standard tools. Ours, each a child process (wall time including Python start-up; peak
RSS from wait4): `obelisk update apply URL --disk ...` (signature, each chunk's SHA-256 before its
write, read-back compare, fsync, GPT attributes), and the daemon's apply, which also checks the Omaha
response's size and whole-payload SHA-256 and checkpoints for resume. Ratios are baseline time / our
time, paired per round (same load), with their spread: the machine is shared, so run several rounds.

    python -m bench apply [--size-mib 1024] [--tmpfs] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from bootloader import gpt, slots
from obelisk import signing
from obelisk.tools import require
from update_engine import payload

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


def _hasher() -> list[str]:
    """`openssl dgst -sha256` (SHA-NI, the code Python's hashlib runs), else coreutils `sha256sum`.

    Debian's sha256sum has no SHA-NI path (190 MiB/s against openssl's 1 GiB/s on the dev VM): a baseline
    built on it would flatter our ratio."""
    openssl = shutil.which("openssl")
    return [openssl, "dgst", "-sha256"] if openssl else [require("sha256sum")]


def _baseline(url: str, disk: Path, offset: int, nbytes: int, verify: bool) -> float:
    """`curl | dd conv=fsync`; with ``verify`` also the SHA-256 of the bytes read back from the disk image."""
    curl, dd = require("curl"), require("dd")
    t = time.perf_counter()
    c = subprocess.Popen([curl, "-sf", url], stdout=subprocess.PIPE)
    d = subprocess.run([dd, f"of={disk}", "bs=1M", "iflag=fullblock", "oflag=seek_bytes", f"seek={offset}",
                        "conv=notrunc,fsync", "status=none"], stdin=c.stdout, check=True)
    assert c.stdout is not None
    c.stdout.close()
    if c.wait() != 0 or d.returncode != 0:
        raise RuntimeError("curl | dd failed")
    if verify:
        r = subprocess.Popen([dd, f"if={disk}", "bs=4M", "iflag=skip_bytes,count_bytes", f"skip={offset}",
                              f"count={nbytes}", "status=none"], stdout=subprocess.PIPE)
        h = subprocess.run(_hasher(), stdin=r.stdout, stdout=subprocess.DEVNULL, check=True)
        assert r.stdout is not None
        r.stdout.close()
        if r.wait() != 0 or h.returncode != 0:
            raise RuntimeError("dd | sha256sum failed")
    return time.perf_counter() - t


def _child(argv: list[str]) -> tuple[float, int]:
    """Run a child to completion; its wall time and its peak RSS (KiB, from wait4)."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err.decode().strip() or out.decode().strip())
    return elapsed, usage.ru_maxrss


def _ours_cli(url: str, disk: Path, key: Path) -> tuple[float, int]:
    """`obelisk update apply URL --disk ...`: a manual apply, no Omaha hash to check."""
    return _child([sys.executable, "-m", "update_engine.cli", "apply", url, "--disk", str(disk), "--key", str(key),
                   "--json"])


DAEMON_PATH = """
import sys
from pathlib import Path
from update_engine.apply import Applier, Policy
from obelisk.signing import load_public_key
url, disk, key, size, sha, state = sys.argv[1:]
Applier(url, Path(disk), [load_public_key(Path(key))], state_dir=Path(state),
        policy=Policy(expected_size=int(size), expected_sha256=sha)).run()
"""


def _ours_daemon_path(url: str, disk: Path, key: Path, size: int, sha: str) -> tuple[float, int]:
    """The daemon's apply: the Omaha response's size and SHA-256 are checked too (one more SHA-256 pass), and
    progress is checkpointed for resume (fdatasync + atomic progress file every 16 MiB)."""
    state = disk.parent / "state"
    shutil.rmtree(state, ignore_errors=True)
    return _child([sys.executable, "-c", DAEMON_PATH, url, str(disk), str(key), str(size), sha, str(state)])


def _reset(disk: Path) -> None:
    slots.set_attrs(disk, slots.USR_B, priority=0, tries=0, successful=False)
    slots.set_attrs(disk, slots.USR_A, priority=1, tries=0, successful=True)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench apply")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tmpfs", action="store_true", help="work in /dev/shm instead of the disk-backed temp dir")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    base = "/dev/shm" if args.tmpfs else None
    work = Path(tempfile.mkdtemp(prefix="obelisk-bench-apply-", dir=base))
    proc = None
    try:
        pl, disk, key = _make(work, size)
        port = _free_port()
        # `obelisk update serve` is the update server's command, mounted by the root CLI.
        proc = subprocess.Popen([sys.executable, "-c", "from obelisk.cli import main; main()", "update", "serve",
                                 str(work / "releases"), "--listen", f"127.0.0.1:{port}", "--no-state"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1/payloads/bench/2.0.0/update.payload"
        for _ in range(200):
            try:
                requests.head(url, timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.05)
        b_off, _ = slots.slot_extent(disk, slots.USR_B)
        nbytes = pl.stat().st_size
        rel = json.loads((pl.parent / "release.json").read_text())["artifacts"]["update.payload"]
        where = "tmpfs (/dev/shm)" if args.tmpfs else f"disk-backed temp dir {work.parent} (sparse disk image)"
        print(f"payload {nbytes / MiB:.0f} MiB, files in {where}, {args.rounds} round(s); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        runs: dict[str, list[float]] = {k: [] for k in ("base", "base_sha", "cli", "daemon")}
        rss = 0
        for i in range(args.rounds):
            # Same order every round; the attributes are reset so every apply sees an unbootable slot B.
            runs["base"].append(_baseline(url, disk, b_off, nbytes, verify=False))
            runs["base_sha"].append(_baseline(url, disk, b_off, nbytes, verify=True))
            _reset(disk)
            t, r = _ours_cli(url, disk, key)
            runs["cli"].append(t)
            rss = max(rss, r)
            _reset(disk)
            t, r = _ours_daemon_path(url, disk, key, rel["size"], rel["sha256"])
            runs["daemon"].append(t)
            rss = max(rss, r)
            _reset(disk)
            print(f"  round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()), flush=True)

        def line(label: str, key: str, note: str) -> None:
            v = sorted(runs[key])
            print(f"{label:36s}: {nbytes / MiB / v[0]:7.1f} MiB/s best ({v[0]:.2f} s; "
                  f"median {statistics.median(v):.2f} s, worst {v[-1]:.2f} s) {note}")

        def ratio(label: str, ours: str, base: str) -> None:
            # Paired per round (same load), then the spread; ratio = baseline time / our time (throughput ratio).
            per = sorted(b / o for b, o in zip(runs[base], runs[ours], strict=True))
            print(f"ratio {label:30s}: median {statistics.median(per):.2f} (rounds {per[0]:.2f}..{per[-1]:.2f})")

        line("baseline curl | dd conv=fsync", "base", "[no hashing, no re-read]")
        tool = " ".join(Path(_hasher()[0]).name.split() + _hasher()[1:])
        line(f"baseline + dd | {tool}", "base_sha", "[+ one SHA-256 pass over the bytes read back]")
        line("obelisk update apply (CLI)", "cli", "[process start, signature, chunk SHA-256s, write, "
             "read-back compare, fsync, GPT]")
        line("apply as the daemon does", "daemon", "[same + whole-payload SHA-256 for Omaha, checkpoints]")
        ratio("CLI / curl|dd", "cli", "base")
        ratio("daemon path / curl|dd", "daemon", "base")
        ratio("CLI / curl|dd + sha256", "cli", "base_sha")
        ratio("daemon path / curl|dd + sha256", "daemon", "base_sha")
        print("goal: ratio >= 0.9 against curl | dd")
        print(f"peak RSS of the apply processes : {rss / 1024:.1f} MiB (goal < 100 MiB)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
