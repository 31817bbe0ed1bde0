"""Stage a target chunk by chunk: copy what the host has, fetch the rest by Range (docs/adaptive.md).

The plan (``chunkplan``) is walked in target order. Every chunk, copied or fetched, is checked against
the SHA-256 the signed manifest's index gives it *before* it is written; written chunks are read back
and compared; the whole target's SHA-256 (and, when the update server announced one, the whole
payload's: header + manifest + the data area, which is the target in order) is computed over the same
bytes, in order. A chunk of a local source that fails its hash (a damaged slot) is fetched instead and
never written. Fetches run ahead of the writer, ``rangefetch.IN_FLIGHT`` at a time, each coalesced
range at most ``chunkplan.MAX_RANGE`` bytes, so memory stays bounded whatever the image size.

Checkpoints are the full path's (``progress``): ``data_done`` target bytes are durably on the slot. A
resumed run needs no more than that: the slot being written is one of the sources, so chunks already
in place are found by indexing it, verified, and left as they are.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from obelisk import diskio
from update_engine import omaha, veritytree
from update_engine.chunkplan import Copy, Fetch, Plan, Rebuild
from update_engine.errors import ApplyError, Stopped
from update_engine.payload import Manifest
from update_engine.progress import Checkpointer
from update_engine.rangefetch import IN_FLIGHT, RangeFetcher, RangeUnusable

log = logging.getLogger("obelisk.update")

ProgressFn = Callable[[str, int, int], None]
PUBLISH_BYTES = 1 << 20  # figures are handed on (status, progress bar) every this many target bytes

_current: dict = {}  # the figures of this process's apply, for `update status --json` (status_socket)
_current_at = [0.0]  # time.monotonic() of the last publish
_current_lock = threading.Lock()


def publish(figures: Figures | None) -> None:
    with _current_lock:
        _current.clear()
        _current_at[0] = time.monotonic()
        if figures is not None:
            _current.update(figures.to_json())


def current(since: float = 0.0) -> dict:
    """The last figures published at or after ``since`` (a status server shows only its own daemon's)."""
    with _current_lock:
        return dict(_current) if _current_at[0] >= since else {}


@dataclass
class Figures:
    """Bytes of the target reused from the host, fetched over the network, and not downloaded (saved)."""

    total: int = 0
    reused: int = 0
    fetched: int = 0
    in_place: int = 0  # reused chunks that were already where they belong (a resumed run)
    rebuilt: int = 0  # verity tree bytes computed from the written data instead of fetched
    damaged: int = 0  # local chunks that failed their hash and were fetched instead
    mode: str = "adaptive"
    resumed_from: int = 0  # bytes a previous run left on the slot
    by_source: dict[str, int] = field(default_factory=dict)  # reused bytes per local source

    @property
    def saved(self) -> int:
        return max(0, self.total - self.fetched)

    def to_json(self) -> dict:
        return {**asdict(self), "saved": self.saved}


class AdaptiveWriter:
    def __init__(self, fd: int, slot_off: int, slot_len: int, m: Manifest, fetcher: RangeFetcher, *,
                 should_stop: Callable[[], bool] = lambda: False, on_progress: ProgressFn | None = None,
                 on_figures: Callable[[Figures], None] | None = None, checkpointer: Checkpointer | None = None,
                 checkpoint_bytes: int = 16 << 20) -> None:
        self.fd, self.slot_off, self.slot_len, self.m = fd, slot_off, slot_len, m
        self.fetcher = fetcher
        self.should_stop = should_stop
        self.on_progress = on_progress
        self.on_figures = on_figures
        self.checkpointer = checkpointer
        self.checkpoint_bytes = checkpoint_bytes
        self.figures = Figures(total=m.target_size)

    def _verified(self, data: bytes, sha: str) -> bool:
        return len(data) > 0 and hashlib.sha256(data).hexdigest() == sha

    def _write(self, data: bytes, offset: int) -> None:
        if offset + len(data) > self.slot_len:  # the manifest was checked; the last line of defence
            raise ApplyError("write would leave the passive slot", omaha.ERR_POSTINSTALL)
        diskio.pwrite_all(self.fd, data, self.slot_off + offset)
        back = os.pread(self.fd, len(data), self.slot_off + offset)
        if back != data:
            raise ApplyError(f"the chunk at {offset} does not read back from the slot as written: check the disk",
                             omaha.ERR_NEW_ROOTFS_VERIFICATION)

    def _fetch_one(self, offset: int, length: int, sha: str) -> bytes:
        data = self.fetcher.fetch(self.m.data_position(offset), length)
        if not self._verified(data, sha):
            raise RangeUnusable(f"the server sent bytes for target offset {offset} that fail their signed hash")
        self.figures.fetched += length
        return data

    def _rebuilt(self, c) -> bytes:
        """The chunk's bytes of the verity area, computed once from the data already on the slot."""
        m = self.m
        if self._area is None:
            self._area = veritytree.build(self.fd, self.slot_off, m.hash_offset // veritytree.BLOCK,
                                          bytes.fromhex(m.verity_salt), m.verity_uuid)
        data = self._area[c.offset - m.hash_offset:c.end - m.hash_offset]
        if self._verified(data, c.sha256):
            self.figures.rebuilt += c.length
            return data
        log.warning("the rebuilt verity tree differs at %d from the signed index: fetching it", c.offset)
        return self._fetch_one(c.offset, c.length, c.sha256)

    def write(self, plan: Plan, whole: hashlib._Hash | None) -> Figures:
        """Stage the whole target; raises ``RangeUnusable`` when the server's ranges cannot be used."""
        m, f = self.m, self.figures
        self._area: bytes | None = None
        # The chunk digests of the signed index cover the target exactly; the whole payload's digest (when
        # the server announced one) covers the same bytes again, so the target's own is only needed without.
        target = hashlib.sha256() if whole is None else None
        fetches = [item for item in plan.items if isinstance(item, Fetch)]
        ahead: collections.deque = collections.deque()
        nxt = 0

        def top_up() -> None:
            nonlocal nxt
            while nxt < len(fetches) and len(ahead) < 2 * IN_FLIGHT:
                it = fetches[nxt]
                ahead.append(self.fetcher.submit(m.data_position(it.offset), it.length))
                nxt += 1

        done = last_checkpoint = last_publish = 0
        try:
            top_up()
            for item in plan.items:
                if self.should_stop():
                    raise Stopped()
                if isinstance(item, Copy):
                    c = item.chunk
                    data = os.pread(item.source.fd, c.length, item.source.offset + item.src_offset)
                    if self._verified(data, c.sha256):
                        if not item.in_place:
                            self._write(data, c.offset)
                        else:
                            f.in_place += c.length
                        f.reused += c.length
                        f.by_source[item.source.name] = f.by_source.get(item.source.name, 0) + c.length
                    else:
                        log.warning("chunk at %d of %s fails its signed hash (a damaged slot): fetching it",
                                    item.src_offset, item.source.name)
                        f.damaged += c.length
                        data = self._fetch_one(c.offset, c.length, c.sha256)
                        self._write(data, c.offset)
                    for h in (target, whole):
                        if h is not None:
                            h.update(data)
                    done = c.end
                elif isinstance(item, Rebuild):
                    c = item.chunk
                    data = self._rebuilt(c)
                    self._write(data, c.offset)
                    for h in (target, whole):
                        if h is not None:
                            h.update(data)
                    done = c.end
                else:
                    fut = ahead.popleft()
                    top_up()
                    blob = fut.result()
                    f.fetched += len(blob)
                    with memoryview(blob) as mv:
                        for c in item.chunks:
                            piece = mv[c.offset - item.offset:c.end - item.offset]
                            if hashlib.sha256(piece).hexdigest() != c.sha256:
                                raise RangeUnusable(f"the server sent bytes for target offset {c.offset} that "
                                                    "fail their signed hash (a wrong range)")
                        self._write(blob, item.offset)
                    for h in (target, whole):
                        if h is not None:
                            h.update(blob)
                    done = item.offset + item.length
                if self.checkpointer is not None and done - last_checkpoint >= self.checkpoint_bytes:
                    self.checkpointer.request(done)
                    last_checkpoint = done
                if self.on_progress:
                    self.on_progress("downloading", done, m.target_size)
                if done - last_publish >= PUBLISH_BYTES or done == m.target_size:
                    publish(f)
                    last_publish = done
                    if self.on_figures:
                        self.on_figures(f)
            if done != m.target_size:
                raise ApplyError(f"the plan covered {done} of {m.target_size} target bytes",
                                 omaha.ERR_NEW_ROOTFS_VERIFICATION)
            if target is not None and target.hexdigest() != m.target_sha256:
                raise ApplyError("the staged target's SHA-256 differs from the signed manifest's",
                                 omaha.ERR_NEW_ROOTFS_VERIFICATION)
            if self.checkpointer is not None:
                self.checkpointer.request(done)
                self.checkpointer.wait()
            diskio.fsync(self.fd)
        finally:
            for fut in ahead:
                fut.cancel()
            if self.checkpointer is not None:
                self.checkpointer.close()
        return f
