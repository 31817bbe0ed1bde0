"""Adaptive updates on tiny: bytes fetched against the full payload, apply time against a full apply of the
same release in the same run (loopback, and throttled to 100 Mbit/s), peak RSS of each apply.

    python -m bench delta [--work DIR] [--rate-mbit 100] [--skip-build]

Builds tiny 1.0.0 and three 1.0.x releases from images/tiny.toml (with SOURCE_DATE_EPOCH fixed, overlays
in DIR): (a) one small file changed, (b) a package-sized file added (this machine's libcrypto.so.3),
(c) a kernel whose every byte past the first 16 KiB differs. Each is applied to a copy of 1.0.0's disk
from a plain static HTTP server on 127.0.0.1 that counts the bytes it sends; each apply runs in its own
process (its peak RSS from wait4). The staged slot is compared with the release's usr.img every time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OBELISK = str(Path(sys.executable).with_name("obelisk"))
EPOCH = "1700000000"
CASES = {"a": ("1.0.1", "one small file changed"), "b": ("1.0.2", "a package-sized file added"),
         "c": ("1.0.3", "the kernel changed")}


def _overlays(work: Path) -> None:
    (work / "ov-base/usr/share/misc").mkdir(parents=True, exist_ok=True)
    (work / "ov-base/usr/share/misc/obelisk-delta.txt").write_text("delta note: first\n")
    (work / "ov-a/usr/share/misc").mkdir(parents=True, exist_ok=True)
    (work / "ov-a/usr/share/misc/obelisk-delta.txt").write_text("delta note: second edition\n")
    (work / "ov-b/usr/lib/extra").mkdir(parents=True, exist_ok=True)
    lib = next(p for p in (Path("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"), Path(sys.executable)) if p.exists())
    shutil.copyfile(lib, work / "ov-b/usr/lib/extra" / lib.name)


def _definition(work: Path, case: str) -> Path:
    files = {"base": ["ov-base"], "a": ["ov-a"], "b": ["ov-base", "ov-b"], "c": ["ov-base", "ov-c"]}[case]
    text = (REPO / "images/tiny.toml").read_text()
    text = text.replace('formats = ["raw"]\n', f'formats = ["raw"]\nfiles = {[str(work / f) for f in files]!r}\n'
                        .replace("'", '"'))
    d = work / f"tiny-{case}.toml"
    d.write_text(text)
    return d


def _build(work: Path, case: str, version: str) -> Path:
    out = work / f"rel-{case}"
    rel = out / "tiny" / version
    if (rel / "update.payload").exists():
        return rel
    print(f"building tiny {version} ({case})", flush=True)
    subprocess.run([OBELISK, "image", "build", str(_definition(work, case)), "--version", version, "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "SOURCE_DATE_EPOCH": EPOCH})
    return rel


def _kernel_overlay(work: Path, base: Path) -> None:
    dest = work / "ov-c/usr/lib/obelisk/boot/vmlinuz"
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(subprocess.run(["unsquashfs", "-o", "0", "-cat", str(base / "usr.img"),
                                     "lib/obelisk/boot/vmlinuz"], check=True, capture_output=True).stdout)
    for i in range(16384, len(data)):
        data[i] ^= 0x5A
    dest.write_bytes(data)


class Static:
    """Single-range static server; counts body bytes; ``rate`` bytes/s caps all its connections together
    (one link: four ranges in flight share it, as they would a host's 100 Mbit/s)."""

    def __init__(self, root: Path, rate: int = 0) -> None:
        self.root, self.rate, self.sent = root, rate, 0
        self.lock = threading.Lock()
        self.t0: float | None = None
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = outer.root / self.path.lstrip("/")
                size = path.stat().st_size
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                a, b = (int(m[1]), int(m[2]) if m[2] else size - 1) if m else (0, size - 1)
                self.send_response(206 if m else 200)
                self.send_header("Content-Length", str(b - a + 1))
                if m:
                    self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                self.end_headers()
                with open(path, "rb") as f:
                    f.seek(a)
                    left = b - a + 1
                    try:
                        while left:
                            piece = f.read(min(64 << 10, left))
                            with outer.lock:
                                if outer.t0 is None:  # the clock starts at the apply's first byte
                                    outer.t0 = time.monotonic()
                                outer.sent += len(piece)
                                ahead = outer.sent / outer.rate - (time.monotonic() - outer.t0) if outer.rate else 0
                            if ahead > 0:
                                time.sleep(ahead)
                            self.wfile.write(piece)
                            left -= len(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


CHILD = """
import json, sys, time
from pathlib import Path
from obelisk.signing import load_public_key
from update_engine.apply import Applier
url, disk, key, adaptive = sys.argv[1:5]
a = Applier(url, Path(disk), [load_public_key(Path(key))], adaptive=adaptive == "1")
t0 = time.perf_counter()
r = a.run()
print(json.dumps({"seconds": time.perf_counter() - t0, **r.transfer}))
"""


def _apply(url: str, disk: Path, key: Path, adaptive: bool) -> tuple[float, int, str]:
    """(seconds of the apply itself, not the interpreter's start; peak RSS of its process; its transfer figures)"""
    p = subprocess.Popen([sys.executable, "-c", CHILD, url, str(disk), str(key), "1" if adaptive else "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    out, errb = p.stdout.read(), p.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"apply failed: {errb.decode()[-400:]}")
    import json

    return json.loads(out)["seconds"], usage.ru_maxrss * 1024, out.decode().strip()


def _slot_matches(disk: Path, usr: Path, work: Path) -> bool:
    """Slot B holds exactly usr.img, and veritysetup verifies it against the release's root hash."""
    import json

    from bootloader import slots

    off, _ = slots.slot_extent(disk, 4)
    want = usr.read_bytes()
    with open(disk, "rb") as f:
        f.seek(off)
        got = f.read(len(want))
    if got != want:
        return False
    rel = json.loads((usr.parent / "release.json").read_text())
    copy = work / "slot.img"
    copy.write_bytes(got)
    ok = subprocess.run(["veritysetup", "verify", str(copy), str(copy), rel["verity_root_hash"],
                         f"--hash-offset={rel['hash_offset']}"], capture_output=True).returncode == 0
    copy.unlink()
    return ok


IMPORTS_ONLY = "import update_engine.apply, obelisk.signing  # noqa"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench delta")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "obelisk-bench-delta")
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    args = ap.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    _overlays(work)
    base = _build(work, "base", "1.0.0")
    _kernel_overlay(work, base)
    rels = {c: _build(work, c, v) for c, (v, _) in CASES.items()}
    key = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "obelisk/dev-key/obelisk.pub"
    root = work / "www"
    root.mkdir(exist_ok=True)
    for c, rel in rels.items():
        shutil.copyfile(rel / "update.payload", root / f"{c}.payload")
    p = subprocess.Popen([sys.executable, "-c", IMPORTS_ONLY], cwd=REPO)
    base_rss = os.wait4(p.pid, 0)[2].ru_maxrss * 1024
    print(f"peak RSS of a process that only imports the apply code: {base_rss / 2**20:.1f} MiB")
    print(f"{'case':<30} {'full B':>11} {'fetched B':>10} {'share':>7} {'full s':>7} {'adapt s':>7} "
          f"{'ratio':>6} {'RSS full':>9} {'RSS adapt':>9}  net")
    for rate in (0, int(args.rate_mbit * 1e6 / 8)):
        net = "loopback" if not rate else f"{args.rate_mbit:g} Mbit/s"
        for c, rel in rels.items():
            srv = Static(root, rate)
            try:
                url = f"{srv.url}/{c}.payload"
                full = (rel / "update.payload").stat().st_size
                disk = work / "disk.raw"
                rows = {}
                for adaptive in (False, True):
                    subprocess.run(["cp", "--sparse=always", str(base / "disk.raw"), str(disk)], check=True)
                    with srv.lock:
                        srv.sent, srv.t0 = 0, None
                    secs, rss, _ = _apply(url, disk, key, adaptive)
                    if not _slot_matches(disk, rel / "usr.img", work):
                        raise SystemExit(f"case {c}: the staged slot differs from usr.img or fails veritysetup verify")
                    rows[adaptive] = (secs, rss, srv.sent)
            finally:
                srv.close()
            (fs, frss, _), (ase, arss, fetched) = rows[False], rows[True]
            label = f"({c}) {CASES[c][1]}"
            print(f"{label:<30} {full:>11,} {fetched:>10,} {100 * fetched / full:>6.2f}% {fs:>7.2f} {ase:>7.2f} "
                  f"{fs / ase:>5.1f}x {frss / 2**20:>7.1f}Mi {arss / 2**20:>7.1f}Mi  {net}", flush=True)
