"""Build time of images/tiny.toml from an empty cache (cold) against a rebuild with a warm cache,
the warm/cold ratio, what checking the cache entries' digests costs in the warm build, and the
size of every artifact.

Usage: python -m bench build [--definition images/tiny.toml] [--keep DIR] [--repro]
--repro adds a second cold build (another empty cache) and compares usr.img, update.payload and
disk.raw byte for byte (e.g. `--definition images/base.toml --repro`).
The downloaded .debs are kept in a shared folder so that "cold" measures building, not the network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OBELISK = str(Path(sys.executable).with_name("obelisk"))


def build_once(defn: str, out: Path, cache: Path, key: Path) -> tuple[float, dict]:
    """(seconds, the --json summary) of one `obelisk image build` (SOURCE_DATE_EPOCH fixed)."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "1704067200")}
    start = time.monotonic()
    proc = subprocess.run([OBELISK, "image", "build", defn, "--out", out, "--cache", cache, "--key", key, "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {proc.stderr.strip().splitlines()[-1:]}")
    return took, json.loads(proc.stdout)


def _same(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _entry_check_seconds(cache: Path, res: dict) -> float:
    """Time to re-hash every cache entry the warm build reused (what the pipeline does before reusing one)."""
    from builder import fsutil, pipeline

    start = time.monotonic()
    for name, stage in res["stages"].items():
        fsutil.entry_digest(cache / "stages" / name / stage["key"], skip=pipeline.ENTRY_DIGEST)
    return time.monotonic() - start


def prepare(work: Path) -> tuple[Path, Path]:
    """(the shared .deb download folder, a fresh signing key) for builds under ``work``: "cold" then
    measures building, not the network."""
    debs = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "obelisk" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run([OBELISK, "key", "generate", work / "key", "--force"], check=True, capture_output=True)
    return debs, work / "key" / "obelisk.key"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench build")
    ap.add_argument("--definition", default="images/tiny.toml")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--repro", action="store_true", help="a second cold build, compared byte for byte")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="obelisk-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        debs, key = prepare(work)
        cache = work / "cache"
        cache.mkdir(exist_ok=True)
        if not (cache / "debs").exists():
            (cache / "debs").symlink_to(debs)
        cold, res = build_once(args.definition, work / "out-cold", cache, key)
        warm, res2 = build_once(args.definition, work / "out-warm", cache, key)
        cached = sum(1 for s in res2["stages"].values() if s["cached"])
        print(f"definition       {args.definition}")
        print("cold stages      " + ", ".join(f"{n} {s['seconds']:.1f}s" for n, s in res["stages"].items()))
        print(f"cold build       {cold:8.2f} s")
        print(f"warm build       {warm:8.2f} s   ({cached}/{len(res2['stages'])} stages cached)")
        print(f"warm/cold ratio  {warm / cold:8.3f}   (speed-up x{cold / warm:.1f})")
        check = _entry_check_seconds(cache, res2)
        print(f"entry digests    {check:8.2f} s   ({check / warm:.0%} of the warm build: every reused entry re-hashed)")
        rel = Path(res["release_dir"])
        if args.repro:
            cache2 = work / "cache2"
            cache2.mkdir(exist_ok=True)
            if not (cache2 / "debs").exists():
                (cache2 / "debs").symlink_to(debs)
            cold2, res3 = build_once(args.definition, work / "out-cold2", cache2, key)
            rel2 = Path(res3["release_dir"])
            for name in ("usr.img", "update.payload", "disk.raw"):
                same = _same(rel / name, rel2 / name)
                print(f"reproducible {name:<16} {'identical' if same else 'DIFFERENT'}")
            print(f"second cold build {cold2:8.2f} s")
        for name, art in sorted(res["release"]["artifacts"].items()):
            alloc = (rel / name).stat().st_blocks * 512
            print(f"size {name:<16} {art['size'] / 2**20:9.1f} MiB apparent  {alloc / 2**20:9.1f} MiB on disk")


if __name__ == "__main__":
    main(sys.argv[1:])
