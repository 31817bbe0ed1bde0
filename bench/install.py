"""`obelisk install` onto a loop device vs `dd` of the same disk.raw onto the same device.

Baselines: `dd if=disk.raw of=LOOP bs=4M conv=fsync` (a bare copy: what a manual install is), and
`sha256sum disk.raw` followed by that dd (check, then copy: the least a careful manual install does).
Ours: `obelisk install RELEASE --disk LOOP` as a child process (wall time including Python start-up):
signature and every checksum of the release first (disk.raw, update.payload, usr.img), then the
stream with its SHA-256, fsync, the backup GPT moved, the PMBR fixed, and a cloud-config written
into OEM with debugfs. Ratios are baseline time / ours, paired per round (the machine is shared).

    python -m bench install [--release out/tiny/1.0.0 --key PUB] [--rounds 3]

Without --release, images/tiny.toml is built first into a temporary folder (about 40 s cold).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from obelisk.tools import require

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
OBELISK = str(Path(sys.executable).with_name("obelisk"))


def _timed(argv: list[str], **kw: object) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t


def _build(work: Path) -> tuple[Path, Path]:
    subprocess.run([OBELISK, "key", "generate", str(work / "key")], check=True, capture_output=True)
    subprocess.run([OBELISK, "image", "build", str(REPO / "images/tiny.toml"), "--out", str(work / "rel"),
                    "--key", str(work / "key/obelisk.key")], check=True, capture_output=True, cwd=REPO)
    return next((work / "rel").glob("*/*/release.json")).parent, work / "key/obelisk.pub"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench install")
    ap.add_argument("--release", type=Path)
    ap.add_argument("--key", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="obelisk-bench-install-") as tmp:
        work = Path(tmp)
        rel, key = (args.release, args.key) if args.release else _build(work)
        image = rel / "disk.raw"
        size = image.stat().st_size
        (work / "cc.yml").write_text("#cloud-config\nhostname: bench\n")
        backing = work / "disk"
        with open(backing, "wb") as f:
            f.truncate(size + 256 * MiB)
        dev = subprocess.run([require("losetup"), "-f", "--show", str(backing)], check=True, capture_output=True,
                             text=True).stdout.strip()
        try:
            rows = []
            for _ in range(args.rounds):
                dd = _timed(["dd", f"if={image}", f"of={dev}", "bs=4M", "conv=fsync"])
                check_dd = _timed(["sha256sum", str(image)]) + _timed(["dd", f"if={image}", f"of={dev}", "bs=4M",
                                                                       "conv=fsync"])
                ours = _timed([OBELISK, "install", str(rel), "--disk", dev, "--config", str(work / "cc.yml"),
                               *(["--key", str(key)] if key else [])])
                rows.append((dd, check_dd, ours))
        finally:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
    print(f"disk.raw {size / MiB:.0f} MiB onto a loop device, {args.rounds} rounds")
    for name, i in (("dd conv=fsync", 0), ("sha256sum + dd", 1), ("obelisk install", 2)):
        times = [r[i] for r in rows]
        print(f"  {name:<16} median {statistics.median(times):6.2f} s  ({size / MiB / statistics.median(times):6.0f}"
              " MiB/s)")
    for name, i in (("dd", 0), ("sha256sum + dd", 1)):
        ratios = [r[i] / r[2] for r in rows]
        print(f"  ratio {name} / ours: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, "
              f"max {max(ratios):.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
