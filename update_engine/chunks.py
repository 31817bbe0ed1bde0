"""Content-defined chunks: where an image is cut depends only on its bytes (docs/adaptive.md).

A cut is placed after the first run of ``WINDOW`` (8) consecutive *marker* bytes that ends at least
``min_size`` bytes after the previous cut; with no such run within ``max_size`` bytes the chunk is cut
at ``max_size`` (and the data's end ends the last one). The marker bytes are a fixed set of byte values
(never 0x00 or 0xff, so runs of padding never cut), chosen from a SHA-256 ordering of the byte values;
how many are markers follows from the average size asked for: with ``n`` markers a window matches with
probability ``(n/256) ** 8``, so over compressed data a chunk is about ``avg_size`` long.

This is a rolling condition over the last 8 bytes, like the gear hash of FastCDC but with a window
that CPython can scan at C speed: ``bytes.translate`` maps every byte to 0 or 1 and ``bytes.find``
looks for eight 1s (a pure-Python gear loop managed about 5 MB/s here, this about 300 MB/s:
``python -m bench delta`` prints both). Because the condition sees only the bytes under the window and
the distance to the previous cut, an insertion or a change shifts only the chunks around it: the first
natural cut after the change lands where it did before and every later cut follows.

The builder indexes the target with it (the manifest's ``index``) and a host indexes what it already
has with the same parameters (the manifest names them), then reuses every chunk whose SHA-256 the new
manifest lists.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

KIND = "obelisk-tr8"  # the name of this chunker in a manifest; another rule gets another name
WINDOW = 8
DEFAULT_AVG = 64 * 1024  # chosen by measurement on two tiny builds (docs/adaptive.md)
READ_BLOCK = 1 << 20  # bytes read and scanned at a time: memory stays flat whatever the image size


@dataclass(frozen=True)
class Chunk:
    offset: int
    length: int
    sha256: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Chunker:
    min_size: int = DEFAULT_AVG // 4
    avg_size: int = DEFAULT_AVG
    max_size: int = DEFAULT_AVG * 4

    def __post_init__(self) -> None:
        if not (WINDOW <= self.min_size < self.avg_size < self.max_size <= 16 << 20):
            raise ValueError(f"chunk sizes must grow: {WINDOW} <= min < avg < max <= 16 MiB "
                             f"(got {self.min_size}, {self.avg_size}, {self.max_size})")

    @classmethod
    def for_average(cls, avg: int) -> Chunker:
        return cls(avg // 4, avg, avg * 4)

    def to_json(self) -> dict:
        return {"kind": KIND, "min": self.min_size, "avg": self.avg_size, "max": self.max_size}

    @cached_property
    def markers(self) -> int:
        """How many byte values are markers: a run of 8 starts with probability p^8 (1 - p), p = n/256,
        and that should be 1 / (avg - min)."""
        want = 1.0 / (self.avg_size - self.min_size)
        return min(range(1, 255), key=lambda n: abs((n / 256) ** WINDOW * (1 - n / 256) - want))

    @cached_property
    def table(self) -> bytes:
        order = sorted(range(1, 255), key=lambda v: hashlib.sha256(b"obelisk-chunker\0" + bytes([v])).digest())
        chosen = set(order[: self.markers])
        return bytes(1 if v in chosen else 0 for v in range(256))

    def cuts(self, data: bytes | bytearray, final: bool) -> tuple[list[int], int]:
        """Cut positions in ``data`` (a chunk starts at 0); and where the undecided rest begins.

        With ``final`` the data's end ends the last chunk; otherwise bytes after the last cut that
        could still belong to a longer chunk are left for the next call (at most ``max_size``)."""
        marks = data.translate(self.table)
        pattern = b"\x01" * WINDOW
        cuts: list[int] = []
        start, n = 0, len(data)
        lo, hi = self.min_size, self.max_size
        while True:
            if n - start <= lo:
                break
            i = marks.find(pattern, start + lo - WINDOW, min(n, start + hi))
            if i >= 0:
                start = i + WINDOW
            elif n - start >= hi:
                start += hi
            else:
                break  # no cut yet within what is here: more data may still bring one
            cuts.append(start)
        if final and start < n:
            cuts.append(n)
            start = n
        return cuts, start

    def scan(self, read: Callable[[int, int], bytes], size: int) -> Iterator[Chunk]:
        """Every chunk of ``size`` bytes read through ``read(offset, n)``, with its SHA-256."""
        base = 0  # offset of buf[0]
        buf = b""
        pos = 0  # next byte to read
        while True:
            want = min(READ_BLOCK, size - pos)
            if want:
                got = read(pos, want)
                if len(got) != want:
                    raise OSError(f"short read at {pos}: {len(got)} of {want} bytes")
                buf = buf + got if buf else got
                pos += want
            final = pos >= size
            cuts, rest = self.cuts(buf, final)
            prev = 0
            with memoryview(buf) as mv:
                for c in cuts:
                    yield Chunk(base + prev, c - prev, hashlib.sha256(mv[prev:c]).hexdigest())
                    prev = c
            buf = buf[rest:]
            base += rest
            if final:
                return

    def index_bytes(self, data: bytes) -> list[Chunk]:
        return list(self.scan(lambda off, n: data[off:off + n], len(data)))

    def index_fd(self, fd: int, offset: int, size: int, split: int = 0) -> list[Chunk]:
        """Chunks of ``size`` bytes of an open file or device from ``offset``; with ``split`` (0 < split < size)
        a cut is forced there and each side is chunked on its own (a USR image: filesystem, then verity area)."""
        out: list[Chunk] = []
        for start, end in ((0, split), (split, size)) if 0 < split < size else ((0, size),):
            for c in self.scan(lambda off, n, s=start: os.pread(fd, n, offset + s + off), end - start):
                out.append(Chunk(c.offset + start, c.length, c.sha256))
        return out

    def index_file(self, path: os.PathLike[str] | str, size: int | None = None, split: int = 0) -> list[Chunk]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.index_fd(fd, 0, os.fstat(fd).st_size if size is None else size, split)
        finally:
            os.close(fd)


def gear_cuts_reference(data: bytes, avg: int = DEFAULT_AVG) -> list[int]:
    """A plain gear-hash (FastCDC-style) cutter in pure Python, only to measure what the fast rule saves."""
    gear = [int.from_bytes(hashlib.sha256(bytes([v])).digest()[:8], "big") for v in range(256)]
    mask = (1 << (avg - avg // 4).bit_length()) - 1 << (64 - (avg - avg // 4).bit_length())
    full = (1 << 64) - 1
    cuts, h, last = [], 0, 0
    lo, hi = avg // 4, avg * 4
    for i, b in enumerate(data):
        h = ((h << 1) + gear[b]) & full
        n = i + 1 - last
        if (n >= lo and not h & mask) or n >= hi:
            cuts.append(i + 1)
            last, h = i + 1, 0
    if last < len(data):
        cuts.append(len(data))
    return cuts
