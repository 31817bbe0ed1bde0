"""What making the default image a host cost: the base image before (bench/definitions/base-before.toml,
the definition as it was without network, SSH, podman and etcd) against images/base.toml, in one run.

    .venv/bin/python -m bench host_image [--keep DIR] [--no-boot]

Prints, for both: cold build time (empty stage cache, shared .deb downloads), warm rebuild time, /usr
(squashfs) and payload sizes, boot to "marked good" under TCG (first boot and a second boot of the
same disk); then what each added package costs: the Installed-Size of everything it pulled in that
the image did not have before (shared dependencies counted once, under the first package listed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.build import build_once as build
from bench.build import prepare
from builder.imagetest import qemu

REPO = Path(__file__).resolve().parent.parent
OBELISK = str(Path(sys.executable).with_name("obelisk"))
BEFORE = "bench/definitions/base-before.toml"
AFTER = "images/base.toml"


def boot_seconds(release: Path, work: Path, timeout: float = 900.0) -> tuple[float, float]:
    """(first boot, second boot): seconds from power-on to the OBELISK-BOOT-GOOD marker."""
    disk = work / "disk.raw"
    subprocess.run(["cp", "--sparse=always", release / "disk.raw", disk], check=True)
    times = []
    for n in (1, 2):
        r = qemu.power_on(disk, work / f"boot{n}.log", boot_timeout=timeout,
                          stop_when=lambda b, line: qemu.GOOD in line or qemu.HEALTH_FAIL in line)
        good = [b for b in r.boots if b.good]
        if not good:
            print(f"  boot {n} of {release} was not marked good: {r.summary()} (log {work / f'boot{n}.log'})")
        times.append(good[-1].good_at if good else float("nan"))
    return times[0], times[1]


def status_of(res: dict, cache: Path) -> dict[str, dict[str, str]]:
    """dpkg's status stanzas of the build's tree, by package."""
    tree = cache / "stages" / "tree" / res["stages"]["tree"]["key"] / "tree"
    out = {}
    for stanza in (tree / "var/lib/dpkg/status").read_text(errors="replace").split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            k, sep, v = line.partition(":")
            if sep and not line[:1].isspace():
                fields[k] = v.strip()
        if fields.get("Status", "").endswith(" installed"):
            out[fields["Package"]] = fields
    return out


def deps(fields: dict[str, str]) -> list[str]:
    names = []
    for key in ("Depends", "Pre-Depends"):
        for alt in fields.get(key, "").split(","):
            for choice in alt.split("|"):
                name = choice.strip().split(" ")[0].split(":")[0]
                if name:
                    names.append(name)
    return names


def closure(roots: list[str], status: dict[str, dict[str, str]]) -> set[str]:
    seen: set[str] = set()
    todo = [r for r in roots if r in status]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo += [d for d in deps(status[p]) if d in status and d not in seen]
    return seen


def costs(before_pkgs: set[str], added: list[str], status: dict[str, dict[str, str]]) -> list[tuple[str, int, int]]:
    """(package, KiB it brought in, how many packages) for each added top-level package."""
    have = set(before_pkgs)
    rows = []
    for name in added:
        new = closure([name], status) - have
        kib = sum(int(status[p].get("Installed-Size", "0") or 0) for p in new)
        rows.append((name, kib, len(new)))
        have |= new
    return rows


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench host_image")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--no-boot", action="store_true", help="skip the boots (sizes and build times only)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="obelisk-bench-host-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        debs, key = prepare(work)
        results = {}
        for label, defn in (("before", BEFORE), ("after", AFTER)):
            cache = work / f"cache-{label}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
            (cache / "debs").symlink_to(debs)
            cold, res = build(defn, work / f"out-{label}", cache, key)
            warm, _ = build(defn, work / f"out-{label}-warm", cache, key)
            rel = Path(res["release_dir"])
            meta = json.loads((rel / "release.json").read_text())
            row = {"cold": cold, "warm": warm, "usr": meta["usr_size"],
                   "payload": meta["artifacts"]["update.payload"]["size"], "res": res, "cache": cache}
            if not args.no_boot:
                bw = work / f"boot-{label}"
                bw.mkdir(exist_ok=True)
                row["boot1"], row["boot2"] = boot_seconds(rel, bw)
            results[label] = row
            print(f"{label:<7} cold build {cold:7.1f} s  warm {warm:6.1f} s  /usr {row['usr'] / 2**20:7.1f} MiB  "
                  f"payload {row['payload'] / 2**20:7.1f} MiB" +
                  ("" if args.no_boot else f"  first boot to good {row['boot1']:6.1f} s  "
                                            f"next boot {row['boot2']:6.1f} s"), flush=True)
        b, a = results["before"], results["after"]
        print(f"ratio   after/before: /usr x{a['usr'] / b['usr']:.2f}, payload x{a['payload'] / b['payload']:.2f}, "
              f"cold build x{a['cold'] / b['cold']:.2f}" +
              ("" if args.no_boot else f", first boot x{a['boot1'] / b['boot1']:.2f}"))
        st_before = status_of(b["res"], b["cache"])
        st_after = status_of(a["res"], a["cache"])
        from builder.definition import load

        added = [p for p in load(REPO / AFTER).source.packages if p not in load(REPO / BEFORE).source.packages]
        print("package costs (Installed-Size of what each one added, dependencies counted once):")
        for name, kib, n in costs(set(st_before), added, st_after):
            print(f"  {name:<22} {kib / 1024:7.1f} MiB  ({n} package{'s' if n != 1 else ''})")
        extra = set(st_after) - set(st_before)
        total = sum(int(st_after[p].get("Installed-Size", "0") or 0) for p in extra)
        print(f"  {'all added':<22} {total / 1024:7.1f} MiB  ({len(extra)} packages; /usr grew by "
              f"{(a['usr'] - b['usr']) / 2**20:.1f} MiB compressed)")


if __name__ == "__main__":
    main(sys.argv[1:])
