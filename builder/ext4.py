"""Pin the one ext4 superblock field that mke2fs 1.47.0 takes from the clock (s_wtime).

``mkfs.ext4 -d`` honours E2FSPROGS_FAKE_TIME for every timestamp but the superblock's last write
time, which it sets on close; with metadata_csum the superblock checksum changes with it. We
rewrite both so that the same inputs give the same bytes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

SB_OFFSET = 1024
WTIME = 0x30
FEATURE_RO_COMPAT = 0x64
RO_COMPAT_METADATA_CSUM = 0x400
CHECKSUM = 0x3FC
MAGIC = 0x38


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """CRC32C without the final inversion: what ext4 stores (ext2fs_crc32c_le with seed ~0)."""
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def pin_write_time(img: Path, epoch: int, *, offset: int = 0) -> None:
    """Set s_wtime of the ext4 filesystem at ``offset`` in ``img`` to ``epoch`` and fix the checksum."""
    with open(img, "r+b") as f:
        f.seek(offset + SB_OFFSET)
        sb = bytearray(f.read(1024))
        if len(sb) != 1024 or struct.unpack_from("<H", sb, MAGIC)[0] != 0xEF53:
            raise ValueError(f"{img}: no ext4 superblock at offset {offset}")
        struct.pack_into("<I", sb, WTIME, epoch)
        if struct.unpack_from("<I", sb, FEATURE_RO_COMPAT)[0] & RO_COMPAT_METADATA_CSUM:
            struct.pack_into("<I", sb, CHECKSUM, crc32c_raw(bytes(sb[:CHECKSUM])))
        f.seek(offset + SB_OFFSET)
        f.write(sb)
        f.flush()
        os.fsync(f.fileno())
