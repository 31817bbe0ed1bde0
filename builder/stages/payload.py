"""Stage payload: the signed update payload for /usr (update_engine.payload owns the format)."""

from __future__ import annotations

from pathlib import Path

from obelisk import signing
from update_engine import payload

DEPENDS = ("usr",)


def inputs(ctx) -> dict:
    d = ctx.definition
    return {"app_id": d.app_id, "arch": d.arch, "version": ctx.version,
            "key": signing.public_key_of(ctx.private_key).key_id,
            "index": payload.DEFAULT_CHUNKER.to_json(), "verity_extra": 1}  # chunk index, verity salt and uuid


def run(ctx, out: Path) -> dict:
    usr = ctx["usr"]
    ctx.log("payload: hashing and signing")
    payload.write_payload(usr.path("usr.img"), out / "update.payload", app_id=ctx.definition.app_id,
                          arch=ctx.definition.arch, version=ctx.version,
                          verity_root_hash=usr.meta["verity_root_hash"], hash_offset=usr.meta["hash_offset"],
                          private_key=ctx.private_key,
                          # lets a host rebuild the verity tree rather than fetch it (docs/adaptive.md)
                          verity_salt=usr.meta.get("verity_salt", ""), verity_uuid=usr.meta.get("verity_uuid", ""))
    return {"size": (out / "update.payload").stat().st_size}
