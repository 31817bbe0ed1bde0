"""Stage usr: /usr as a gzip squashfs (GRUB 2.06 reads gzip, not zstd) followed by its dm-verity hash
tree in the same image, at ``hash_offset`` = squashfs size rounded up to 4096."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

from builder.definition import MIB
from builder.errors import BuildError
from obelisk import tools

DEPENDS = ("tree",)
BLOCK = 4096


def inputs(ctx) -> dict:
    return {"epoch": ctx.epoch, "salt": _salt(ctx)}


def _salt(ctx) -> str:
    """One verity salt per image definition (name and app id), the same for every build of it: a salt taken
    from the filesystem's bytes changed every hash of the tree with any change of /usr, so a host fetched
    the whole tree again on each update (docs/adaptive.md); with a stable salt only the hashes of blocks
    that changed do."""
    return hashlib.sha256(f"obelisk-verity-salt\0{ctx.definition.app_id}\0{ctx.name}".encode()).hexdigest()


def run(ctx, out: Path) -> dict:
    tree = ctx["tree"].path("tree")
    img = out / "usr.img"
    ctx.log("usr: mksquashfs (gzip)")
    tools.run(["mksquashfs", tree / "usr", img, "-comp", "gzip", "-noappend", "-no-progress", "-quiet",
               "-all-root", "-no-xattrs", "-reproducible"],
              # SOURCE_DATE_EPOCH sets the creation time and clamps file times (the tree is clamped already).
              env={"SOURCE_DATE_EPOCH": str(ctx.epoch)}, timeout=3600)
    fs_size = img.stat().st_size
    hash_offset = -(-fs_size // BLOCK) * BLOCK
    with img.open("r+b") as f:
        f.truncate(hash_offset)
    # The uuid comes from the filesystem's bytes (the same /usr gives the same verity metadata); the salt
    # from the definition, so unchanged blocks keep their hashes from one release to the next.
    seed = _digest(img)
    salt = _salt(ctx)
    vuuid = uuid.UUID(bytes=hashlib.sha256(b"obelisk-verity-uuid\0" + seed).digest()[:16], version=4)
    ctx.log("usr: veritysetup format")
    res = tools.run(["veritysetup", "format", "--hash=sha256", f"--data-block-size={BLOCK}",
                     f"--hash-block-size={BLOCK}", f"--data-blocks={hash_offset // BLOCK}",
                     f"--hash-offset={hash_offset}", f"--salt={salt}", f"--uuid={vuuid}", img, img], timeout=1800)
    m = re.search(r"Root hash:\s*([0-9a-f]{64})", res.stdout)
    if not m:
        raise tools.ToolError("veritysetup format printed no root hash")
    return {"verity_root_hash": m.group(1), "hash_offset": hash_offset, "squashfs_size": fs_size,
            "usr_size": img.stat().st_size, "verity_salt": salt, "verity_uuid": str(vuuid)}


def _digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def check(ctx, result) -> None:
    need = result.meta["usr_size"]
    have = ctx.definition.disk.usr_mib * MIB
    if need > have:
        need_mib = -(-need // MIB)
        raise BuildError(
            f"/usr needs {need_mib} MiB ({need} bytes with its verity hash tree) but disk.usr_mib is "
            f"{ctx.definition.disk.usr_mib}: set disk.usr_mib to at least {need_mib} in {ctx.definition_path}"
        )
