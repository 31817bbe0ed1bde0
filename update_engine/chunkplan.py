"""The adaptive plan: which chunks of a new target a host copies from what it has, which it fetches.

Sources are what the host already holds (docs/adaptive.md): the slot it keeps (the running or last good
one), the slot being written if it still holds an old image (reads from it are only planned where the
writer has not reached yet), or a saved index of a slot (``slot-index-<N>.json`` in the state dir, kept
since that slot was staged: no pass over the slot to index it). Each is indexed with the chunker the new
manifest names; every target chunk whose SHA-256 one of them has is copied from there, the others are
fetched from the payload with HTTP Range requests, adjacent ones coalesced into one request of at most
``MAX_RANGE`` bytes. The same planner serves the host (``adaptive``) and ``obelisk image diff``.

A plan is only a proposal: every chunk is verified against the signed manifest before it is written,
whichever source it comes from, so a wrong index or a damaged slot costs bytes, never correctness.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from obelisk.atomicfile import write_atomic
from update_engine import chunks as cdc
from update_engine import payload
from update_engine.payload import Manifest

MAX_RANGE = 1 << 20  # bytes per Range request: with 8 queued, at most 8 MiB of fetched data in memory
REQUEST_COST = 1024  # bytes a request costs on the wire beyond its body (headers both ways), for the choice
WORTH = 0.9  # below this share of the full data, chunk by chunk beats reading the payload front to back
INDEX_FILE = "slot-index-{index}.json"

SQUASHFS_MAGIC = b"hsqs"
VERITY_MAGIC = b"verity\0\0"


@dataclass
class LocalSource:
    """Bytes the host has: ``size`` bytes from ``offset`` of the open ``fd`` (a slot of the disk)."""

    name: str
    fd: int
    offset: int
    size: int
    written: bool = False  # the slot being written: usable only where the writer has not reached yet
    chunks: list[cdc.Chunk] | None = None  # a saved index (else the slot is indexed)
    split: int = 0  # the image's hash_offset: indexed on each side of it, as the builder does

    def index(self, chunker: cdc.Chunker) -> list[cdc.Chunk]:
        if self.chunks is None:
            self.chunks = chunker.index_fd(self.fd, self.offset, self.size, self.split)
        return self.chunks


@dataclass(frozen=True)
class Copy:
    chunk: cdc.Chunk  # of the target
    source: LocalSource
    src_offset: int  # in the source

    @property
    def in_place(self) -> bool:
        return self.source.written and self.src_offset == self.chunk.offset


@dataclass(frozen=True)
class Fetch:
    chunks: tuple[cdc.Chunk, ...]  # adjacent target chunks fetched with one Range request

    @property
    def offset(self) -> int:
        return self.chunks[0].offset

    @property
    def length(self) -> int:
        return self.chunks[-1].end - self.chunks[0].offset


@dataclass(frozen=True)
class Rebuild:
    chunk: cdc.Chunk  # inside the verity hash area: computed from the data written before it (veritytree)


@dataclass
class Plan:
    items: list[Copy | Fetch | Rebuild]
    total: int  # target bytes
    manifest_bytes: int  # header + manifest + signature: fetched whatever the plan
    reused: int = 0
    fetched: int = 0
    rebuilt: int = 0  # verity tree bytes the host computes instead of fetching
    requests: int = 0
    by_source: dict[str, int] = field(default_factory=dict)

    @property
    def saved(self) -> int:
        return self.total - self.fetched

    @property
    def worth_it(self) -> bool:
        """Chunk by chunk costs less than the whole data area, by a margin."""
        return self.fetched + self.requests * REQUEST_COST < WORTH * self.total

    def to_json(self) -> dict:
        full = self.total + self.manifest_bytes
        return {"target_bytes": self.total, "full_payload_bytes": full, "reused": self.reused,
                "fetched": self.fetched, "rebuilt": self.rebuilt, "saved": self.saved, "requests": self.requests,
                "manifest_bytes": self.manifest_bytes,
                "fetched_share": round((self.fetched + self.manifest_bytes) / full, 5) if full else 0.0,
                "reused_by_source": dict(self.by_source), "adaptive": self.worth_it}


def adaptive_ok(m: Manifest) -> bool:
    """The data area is the target in order (every operation a replace at its own offset) and indexed."""
    return m.index is not None and all(op.type == payload.OP_REPLACE and op.data_offset == op.dst.offset
                                       for op in m.operations)


def can_rebuild_tree(m: Manifest) -> bool:
    """The manifest says enough (salt, uuid) to rebuild its verity area, and the area is what we would build."""
    from update_engine import veritytree

    return bool(m.verity_salt) and m.target_size - m.hash_offset == veritytree.area_size(m.hash_offset // 4096)


def make_plan(m: Manifest, sources: list[LocalSource], *, rebuild_tree: bool = True) -> Plan:
    assert m.index is not None
    chunker = m.index.chunker
    have: dict[str, list[tuple[LocalSource, int]]] = {}
    for src in sources:
        for c in src.index(chunker):
            have.setdefault(c.sha256, []).append((src, c.offset))
    items: list[Copy | Fetch | Rebuild] = []
    pending: list[cdc.Chunk] = []
    rebuild = rebuild_tree and can_rebuild_tree(m)
    plan = Plan(items, m.index.chunks[-1].end if m.index.chunks else 0, m.data_offset)

    def flush() -> None:
        if pending:
            items.append(Fetch(tuple(pending)))
            plan.fetched += items[-1].length
            plan.requests += 1
            pending.clear()

    for c in m.index.chunks:
        pick = None
        for src, off in have.get(c.sha256, ()):
            if src.written and off < c.offset:
                continue  # the writer has overwritten it by then
            if src.written and off == c.offset:
                pick = (src, off)  # already in place: nothing to write
                break
            if pick is None or (pick[0].written and not src.written):
                pick = (src, off)  # prefer the kept slot: it cannot change under us
        if pick is None and rebuild and c.offset >= m.hash_offset:
            flush()
            items.append(Rebuild(c))
            plan.rebuilt += c.length
            continue
        if pick is None:
            if pending and pending[-1].end - pending[0].offset + c.length > MAX_RANGE:
                flush()
            pending.append(c)
            continue
        flush()
        items.append(Copy(c, pick[0], pick[1]))
        plan.reused += c.length
        plan.by_source[pick[0].name] = plan.by_source.get(pick[0].name, 0) + c.length
    flush()
    return plan


# ---------------------------------------------------------------- what a slot holds


def image_size(fd: int, offset: int, slot_len: int) -> int | None:
    """Bytes of the USR image at ``offset`` (squashfs, then its dm-verity superblock and hash tree), or
    None when the slot holds no image this host can size (never written, wiped, or another format)."""
    found = image_layout(fd, offset, slot_len)
    return found[0] if found else None


def image_layout(fd: int, offset: int, slot_len: int) -> tuple[int, int] | None:
    """(image size, hash offset) of the USR image at ``offset``; see ``image_size``."""
    size = _image_size(fd, offset, slot_len)
    if size is None:
        return None
    used = struct.unpack_from("<Q", os.pread(fd, 48, offset), 40)[0]
    return size, min(size, -(-used // 4096) * 4096)


def _image_size(fd: int, offset: int, slot_len: int) -> int | None:
    head = os.pread(fd, 96, offset)
    if len(head) < 96 or head[:4] != SQUASHFS_MAGIC:
        return None
    used = struct.unpack_from("<Q", head, 40)[0]
    hash_offset = -(-used // 4096) * 4096
    if not 0 < hash_offset < slot_len:
        return None
    sb = os.pread(fd, 4096, offset + hash_offset)
    if len(sb) < 64 or sb[:8] != VERITY_MAGIC:
        return min(slot_len, hash_offset)  # a filesystem without a tree after it: index what is there
    # struct verity_sb: magic, version, hash_type, uuid[16], algorithm[32], data/hash block size, data blocks
    data_block, hash_block = struct.unpack_from("<II", sb, 64)
    data_blocks = struct.unpack_from("<Q", sb, 72)[0]
    if data_block not in (512, 1024, 2048, 4096) or hash_block not in (512, 1024, 2048, 4096) or not data_blocks:
        return hash_offset
    per = hash_block // 32  # sha256 digests per hash block
    blocks, level = 0, data_blocks
    while True:
        level = -(-level // per)
        blocks += level
        if level <= 1:
            break
    return min(slot_len, hash_offset + hash_block + blocks * hash_block)  # superblock + tree


def slot_source(name: str, fd: int, offset: int, length: int, *, written: bool,
                saved: list[cdc.Chunk] | None = None) -> LocalSource | None:
    if saved is not None:
        return LocalSource(name, fd, offset, saved[-1].end if saved else 0, written, saved)
    found = image_layout(fd, offset, length)
    if found is None:
        return None
    return LocalSource(name, fd, offset, found[0], written, split=found[1])


# ---------------------------------------------------------------- saved index files


def save_index(state_dir: Path, index: int, m: Manifest) -> None:
    """Keep the index of what was just staged into slot ``index``, for the update after the next one."""
    assert m.index is not None
    doc = {"target_sha256": m.target_sha256, "version": m.version, **m.index.to_json()}
    write_atomic(state_dir / INDEX_FILE.format(index=index), json.dumps(doc, separators=(",", ":")).encode(),
                 mode=0o600)


def drop_index(state_dir: Path | None, index: int) -> None:
    if state_dir is not None:
        (state_dir / INDEX_FILE.format(index=index)).unlink(missing_ok=True)


def load_index(state_dir: Path | None, index: int, chunker: cdc.Chunker) -> list[cdc.Chunk] | None:
    """The saved index of slot ``index`` if it was cut with ``chunker``; None if there is none or it is unusable."""
    if state_dir is None:
        return None
    try:
        doc = json.loads((state_dir / INDEX_FILE.format(index=index)).read_text())
        ck = doc["chunker"]
        if (ck.get("kind"), ck.get("min"), ck.get("avg"), ck.get("max")) != tuple(chunker.to_json().values()):
            return None
        out, pos = [], 0
        for length, sha in doc["chunks"]:
            if not isinstance(length, int) or length <= 0 or not isinstance(sha, str) or len(sha) != 64:
                return None
            out.append(cdc.Chunk(pos, length, sha))
            pos += length
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a torn or foreign file: index the slot instead (chunks are verified anyway)
