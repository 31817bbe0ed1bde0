"""Rebuild a dm-verity hash area (superblock + hash tree) from the data, as ``veritysetup format`` lays it out.

Format 1, SHA-256, 4 KiB data and hash blocks (what the builder makes): each hash is
``sha256(salt + block)``; a hash block holds 128 of them, zero padded; levels are stored from the top
(one block) down to level 0 (the hashes of the data blocks), after a 4 KiB block holding the 512-byte
superblock. An adaptive host rebuilds the part of the tree it does not have instead of fetching it, and
still checks every rebuilt chunk against the signed manifest's chunk index before writing it, so a
mistake here costs a fetch, never a wrong byte.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid

BLOCK = 4096
PER_BLOCK = BLOCK // 32


def _levels(data_blocks: int) -> list[int]:
    """Blocks per level, level 0 first."""
    out, n = [], data_blocks
    while True:
        n = -(-n // PER_BLOCK)
        out.append(n)
        if n <= 1:
            return out


def area_size(data_blocks: int) -> int:
    return BLOCK + sum(_levels(data_blocks)) * BLOCK


def superblock(salt: bytes, vuuid: str, data_blocks: int) -> bytes:
    sb = struct.pack("<8sII16s32sIIQH6x", b"verity\0\0", 1, 1, uuid.UUID(vuuid).bytes, b"sha256", BLOCK, BLOCK,
                     data_blocks, len(salt))
    sb += salt.ljust(256, b"\0")
    return sb.ljust(BLOCK, b"\0")


def build(fd: int, offset: int, data_blocks: int, salt: bytes, vuuid: str) -> bytes:
    """The hash area for ``data_blocks`` blocks of data at ``offset`` of ``fd`` (read 8 MiB at a time)."""
    level0 = bytearray()
    step = 2048  # blocks per read
    for first in range(0, data_blocks, step):
        n = min(step, data_blocks - first)
        buf = os.pread(fd, n * BLOCK, offset + first * BLOCK)
        if len(buf) != n * BLOCK:
            raise OSError(f"short read of the data at block {first}")
        with memoryview(buf) as mv:
            for i in range(n):
                level0 += hashlib.sha256(salt + mv[i * BLOCK:(i + 1) * BLOCK]).digest()
    levels = [_pad(level0)]
    while len(levels[-1]) > BLOCK:
        below = levels[-1]
        up = bytearray()
        for i in range(0, len(below), BLOCK):
            up += hashlib.sha256(salt + below[i:i + BLOCK]).digest()
        levels.append(_pad(up))
    return superblock(salt, vuuid, data_blocks) + b"".join(reversed(levels))


def _pad(b: bytearray) -> bytes:
    return bytes(b) + bytes(-len(b) % BLOCK)
