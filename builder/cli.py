"""`obelisk image` and `obelisk key`: parse, call, print."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from bootloader.esp import EspError
from bootloader.gpt import GptError
from bootloader.initramfs import InitramfsError
from builder import definition, inspect, verify
from builder.build import DEFAULT_DEFINITION, build
from builder.errors import BuildError
from builder.imagetest.cli import test as image_test
from builder.kernel import KernelError
from obelisk import signing
from obelisk.atomicfile import write_atomic
from obelisk.errors import clean_errors
from obelisk.tools import ToolError
from update_engine.payload import PayloadError

console = Console(stderr=True)

image_app = typer.Typer(help="Build, verify, inspect and test OS images.", no_args_is_help=True)
TRUSTED_KEYS_DIR = Path("/") / signing.IMAGE_KEYS_DIR
key_app = typer.Typer(help="Manage Ed25519 signing keys.", no_args_is_help=True)

BUILD_ERRORS = (definition.DefinitionError, BuildError, ToolError, signing.SigningError, KernelError, GptError,
                PayloadError, InitramfsError, EspError)


@image_app.command("build")
def image_build(
    definition_file: Path = typer.Argument(DEFAULT_DEFINITION, metavar="[DEF]", help="Image definition (TOML)"),
    out: Path = typer.Option(Path("out"), "--out", help="Releases go to OUT/<name>/<version>/"),
    version: str = typer.Option(None, "--version", help="Release version (default: the definition's)"),
    key: Path = typer.Option(None, "--key", help="Ed25519 private key (default: a development key)"),
    formats: str = typer.Option(None, "--format", help="Comma list of raw, qcow2, pxe (default: the definition's)"),
    cache: Path = typer.Option(None, "--cache", help="Stage cache (default: $XDG_CACHE_HOME/obelisk)"),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout"),
) -> None:
    """Build a release: disk image(s), usr.img, update.payload, release.json, signed SHA256SUMS."""
    with clean_errors(*BUILD_ERRORS, OSError):
        summary = build(definition_file, out=out, version=version, key=key, formats=formats, cache=cache,
                        console=console)
    stages = {s.name: {"cached": s.cached, "seconds": round(s.seconds, 3), "key": s.key} for s in summary.stages}
    if json_out:
        print(json.dumps({"release_dir": str(summary.release_dir), "stages": stages,
                          "all_cached": summary.all_cached, "release": summary.release}, indent=2))
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
    with clean_errors(verify.VerifyError, signing.SigningError):
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
) -> None:
    """Partitions, slots, versions and root hashes of a disk image or release."""
    with clean_errors(inspect.InspectError, GptError, OSError):
        info = inspect.inspect(target)
    if json_out:
        print(json.dumps(info, indent=2))
        return
    if "release" in info:
        r = info["release"]
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


image_app.command("test")(image_test)  # the boot chain's VM scenarios (builder/imagetest)


@key_app.command("generate")
def key_generate(
    directory: Path = typer.Argument(..., help="Where to write obelisk.key (0600) and obelisk.pub"),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair"),
) -> None:
    """Make a signing key pair: DIR/obelisk.key (private, 0600) and DIR/obelisk.pub."""
    with clean_errors(signing.SigningError, OSError):
        priv, pub = signing.generate_keypair(directory, overwrite=force)
    kid = signing.load_public_key(pub).key_id
    print(f"private key: {priv}\npublic key:  {pub}\nkey id:      {kid}")


@key_app.command("sign")
def key_sign(
    file: Path = typer.Argument(..., help="File to sign"),
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (obelisk.key)"),
    out: Path = typer.Option(None, "--out", help="Signature file (default: FILE.sig)"),
) -> None:
    """Write a detached Ed25519 signature of FILE (64 raw bytes, like SHA256SUMS.sig)."""
    with clean_errors(signing.SigningError, OSError):
        sig = signing.sign(signing.load_private_key(key), file.read_bytes())
        dest = out or file.with_name(file.name + ".sig")
        write_atomic(dest, sig)
    print(f"signed {file} -> {dest}")


@key_app.command("verify")
def key_verify(
    file: Path = typer.Argument(..., help="Signed file"),
    sig: Path = typer.Argument(None, help="Signature file (default: FILE.sig)"),
    key: list[Path] = typer.Option(None, "--key", help="Trusted public key (repeatable; default: the image's keys)"),
) -> None:
    """Check a detached signature against the given keys or the image's trusted keys; exit 1 if it does not verify."""
    with clean_errors(signing.SigningError, OSError):
        keys = [signing.load_public_key(k) for k in key] if key else signing.load_trusted_keys(TRUSTED_KEYS_DIR)
        data, signature = file.read_bytes(), (sig or file.with_name(file.name + ".sig")).read_bytes()
    with clean_errors(signing.SigningError, code=1):
        signer = signing.verify_any(keys, data, signature)
    print(f"{file}: signed by {signer.key_id}")
