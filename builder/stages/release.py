"""Stage release: release.json, SHA256SUMS and its Ed25519 signature SHA256SUMS.sig."""

from __future__ import annotations

import json
from pathlib import Path

from builder import fsutil, packages
from obelisk import signing

DEPENDS = ("usr", "disk", "payload", "formats")
RELEASE_FORMAT = 1


def artifacts(ctx) -> dict[str, Path]:
    """Release file name -> cached file, in a stable order."""
    files: dict[str, Path] = {}
    if "raw" in ctx.formats:
        files["disk.raw"] = ctx["disk"].path("disk.raw")
    for name in ctx["formats"].meta.get("files", []):
        files[name] = ctx["formats"].path(name)
    files["usr.img"] = ctx["usr"].path("usr.img")
    files["update.payload"] = ctx["payload"].path("update.payload")
    return files


def inputs(ctx) -> dict:
    d = ctx.definition
    return {"formats": sorted(ctx.formats), "key": signing.public_key_of(ctx.private_key).key_id,
            "name": d.name, "version": ctx.version, "build_id": ctx.build_id, "app_id": d.app_id,
            "inputs_digest": ctx.inputs_digest, "epoch": ctx.epoch}


def run(ctx, out: Path) -> dict:
    d = ctx.definition
    usr = ctx["usr"].meta
    arts = {}
    for name, path in artifacts(ctx).items():
        ctx.log(f"release: sha256 {name}")
        arts[name] = {"size": path.stat().st_size, "sha256": fsutil.sha256_file(path)}
    manifest_file = ctx["tree"].path("tree") / packages.MANIFEST_PATH
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else packages.to_json([])
    pkg_blob = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    (out / "packages.json").write_bytes(pkg_blob)
    release = {
        "format": RELEASE_FORMAT,
        "name": d.name,
        "version": ctx.version,
        "build_id": ctx.build_id,
        "app_id": d.app_id,
        "arch": d.arch,
        "source_date_epoch": ctx.epoch,
        "inputs_digest": ctx.inputs_digest,
        "kernel_version": ctx["tree"].meta.get("kernel_version"),
        "verity_root_hash": usr["verity_root_hash"],
        "hash_offset": usr["hash_offset"],
        "usr_size": usr["usr_size"],
        "signing_key_id": signing.public_key_of(ctx.private_key).key_id,
        "trusted_key_ids": [n.removesuffix(".pub") for n, _pem in ctx.trusted_keys],
        "partitions": ctx["disk"].meta.get("partitions", {}),
        "artifacts": arts,
        "packages": manifest["packages"],
    }
    blob = (json.dumps(release, indent=2, sort_keys=True) + "\n").encode()
    (out / "release.json").write_bytes(blob)
    sums = {**{n: a["sha256"] for n, a in arts.items()}, "release.json": fsutil.sha256_bytes(blob),
            "packages.json": fsutil.sha256_bytes(pkg_blob)}
    text = "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())).encode()
    (out / "SHA256SUMS").write_bytes(text)
    (out / "SHA256SUMS.sig").write_bytes(signing.sign(ctx.private_key, text))
    return {"artifacts": sorted(arts)}
