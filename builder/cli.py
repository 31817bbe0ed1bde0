"""`obelisk image`: parse, call, print. (`obelisk key` is obelisk/keycli.py: hosts run it too.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from builder import cache as stage_cache
from builder import inspect, verify
from builder.build import DEFAULT_DEFINITION, build
from builder.diff_cli import diff as image_diff
from builder.imagetest.cli import test as image_test
from builder.pipeline import default_cache_dir
from obelisk.errors import clean_errors

console = Console(stderr=True)

image_app = typer.Typer(help="Build, verify, inspect and test OS images.", no_args_is_help=True)


@image_app.command("build")
def image_build(
    definition_file: Path = typer.Argument(DEFAULT_DEFINITION, metavar="[DEF]", help="Image definition (TOML)"),
    out: Path = typer.Option(Path("out"), "--out", help="Releases go to OUT/<name>/<version>/"),
    version: str = typer.Option(None, "--version", help="Release version (default: the definition's)"),
    key: Path = typer.Option(None, "--key", help="Ed25519 private key (default: a development key)"),
    formats: str = typer.Option(None, "--format", help="Comma list of raw, qcow2, pxe (default: the definition's)"),
    cache: Path = typer.Option(None, "--cache", help="Stage cache (default: $XDG_CACHE_HOME/obelisk)"),
    cache_max_size: str = typer.Option(None, "--cache-max-size", metavar="SIZE",
                                       help="Prune the stage cache to SIZE after the build, least recently used "
                                            "first (default: $OBELISK_CACHE_MAX_SIZE or 10G; 'unlimited')"),
    offline: bool = typer.Option(False, "--offline", help="Do not ask the Debian archive for its state: "
                                 "reuse the rootfs cached for the state seen last"),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout"),
) -> None:
    """Build a release: disk image(s), usr.img, update.payload, release.json, signed SHA256SUMS."""
    with clean_errors():
        cap = stage_cache.parse_size(cache_max_size, "--cache-max-size") if cache_max_size else "default"
        summary = build(definition_file, out=out, version=version, key=key, formats=formats, cache=cache,
                        console=console, offline=offline, cache_max_size=cap)
    stages = {s.name: {"cached": s.cached, "seconds": round(s.seconds, 3), "key": s.key} for s in summary.stages}
    if json_out:
        print(json.dumps({"release_dir": str(summary.release_dir), "stages": stages,
                          "all_cached": summary.all_cached, "release": summary.release,
                          "cache_pruned": summary.pruned.to_json() if summary.pruned else None}, indent=2))
        return
    rel = summary.release
    print(f"release {rel['name']} {rel['version']} (build {rel['build_id']}) -> {summary.release_dir}")
    print(f"verity root hash {rel['verity_root_hash']}")
    for name, art in rel["artifacts"].items():
        print(f"  {name:<16} {art['size']:>14,} bytes  {art['sha256'][:16]}")
    cached = sum(1 for s in summary.stages if s.cached)
    print(f"stages: {cached}/{len(summary.stages)} cached")


@image_app.command("verify")
def image_verify(
    release_dir: Path = typer.Argument(..., help="A release folder (out/<name>/<version>)"),
    key: Path = typer.Option(None, "--key", help="Trusted public key (default: the development key's)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Check SHA256SUMS.sig, every checksum and release.json; exit 1 on any mismatch."""
    with clean_errors():
        report = verify.verify(release_dir, key)
    if json_out:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            print(line)
    if not report.ok:
        raise typer.Exit(1)


@image_app.command("inspect")
def image_inspect(
    target: Path = typer.Argument(..., metavar="DISK_OR_RELEASE", help="A disk image or a release folder"),
    json_out: bool = typer.Option(False, "--json"),
    packages: bool = typer.Option(False, "--packages", help="list the packages inside (name, version, source)"),
) -> None:
    """Partitions, slots, versions and root hashes of a disk image or release; --packages: what is inside."""
    with clean_errors():
        if packages:
            pkgs = inspect.release_packages(target)
        else:
            info = inspect.inspect(target)
    if packages:
        if json_out:
            print(json.dumps({"packages": pkgs}, indent=2))
            return
        table = Table(title=f"{len(pkgs)} packages in {target}")
        for col in ("name", "version", "source", "kind"):
            table.add_column(col)
        for p in pkgs:
            table.add_row(p["name"], p["version"], p["source"], p["kind"])
        Console().print(table)
        return
    if json_out:
        print(json.dumps(info, indent=2))
        return
    if "release" in info:
        r = {k: info["release"].get(k, "?") for k in ("name", "version", "build_id", "app_id", "arch",
                                                       "verity_root_hash", "hash_offset")}
        print(f"release {r['name']} {r['version']} build {r['build_id']} app {r['app_id']} arch {r['arch']}")
        print(f"verity root hash {r['verity_root_hash']} hash offset {r['hash_offset']}")
    disk = info.get("disk")
    if disk:
        table = Table(title=f"{disk['path']} (disk GUID {disk['disk_guid']})")
        for col in ("#", "label", "start", "size", "type", "slot"):
            table.add_column(col)
        for p in disk["partitions"]:
            slot = p.get("slot")
            state = f"P={slot['priority']} T={slot['tries']} S={int(slot['successful'])}" if slot else ""
            table.add_row(str(p["index"]), p["name"], str(p["offset"]), str(p["size"]), p["type"], state)
        Console().print(table)
        for s in disk.get("slots", []):
            print(f"slot {s['name']}: version {s.get('version') or '-'} root hash {s.get('root_hash') or '-'}")


cache_app = typer.Typer(help="The build's stage cache: what it holds, and pruning it.", no_args_is_help=True)
image_app.add_typer(cache_app, name="cache")
CACHE_OPT = typer.Option(None, "--cache", help="Stage cache (default: $XDG_CACHE_HOME/obelisk)")


@cache_app.command("list")
def cache_list(cache: Path = CACHE_OPT, json_out: bool = typer.Option(False, "--json")) -> None:
    """Every cached stage entry with its size and when a build last used it, oldest use first."""
    where = cache or default_cache_dir()
    listed = stage_cache.entries(where)
    total = sum(e.size for e in listed)
    if json_out:
        print(json.dumps({"cache": str(where), "total": total, "entries": [e.to_json() for e in listed]}, indent=2))
        return
    table = Table(title=f"{len(listed)} entries, {stage_cache.human(total)} in {where}")
    for col in ("stage", "key", "size", "last used"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for e in listed:
        table.add_row(e.stage, e.key, stage_cache.human(e.size),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used)))
    Console().print(table)


@cache_app.command("prune")
def cache_prune(
    cache: Path = CACHE_OPT,
    max_size: str = typer.Option(None, "--max-size", metavar="SIZE",
                                 help="Keep at most SIZE, e.g. 10G or 0 (default: the build's cap, 10G)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; remove nothing"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Remove the least recently used entries until the cache fits in SIZE."""
    with clean_errors():
        cap = stage_cache.parse_size(max_size) if max_size else stage_cache.default_max_size()
        if cap is None:
            raise stage_cache.BuildError("--max-size unlimited: nothing to prune; give a size such as 10G")
        result = stage_cache.prune(cache or default_cache_dir(), cap, dry_run=dry_run)
    if json_out:
        print(json.dumps({**result.to_json(), "dry_run": dry_run}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for e in result.removed:
        print(f"{verb} {e.stage}/{e.key} ({stage_cache.human(e.size)})")
    print(f"{verb} {len(result.removed)} entries: {stage_cache.human(result.before)} -> "
          f"{stage_cache.human(result.after)} (cap {stage_cache.human(cap)})")


image_app.command("test")(image_test)  # the boot chain's VM scenarios (builder/imagetest)
image_app.command("diff")(image_diff)  # what a host on OLD downloads to reach NEW (builder/diff_cli.py)
