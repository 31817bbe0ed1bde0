"""Write a verified payload's data into a slot: a pipeline of three threads, every byte read back.

The data area is a sequence of *pieces*: each ``replace`` operation's blob cut into ``chunk_size``
pieces (the last one of an operation may be short), each with its signed SHA-256 and its place in
the slot. Operations are handled one after the other, so a manifest with several operations (or an
empty one) streams like one with a single operation.

reader:  socket → buffer (``readinto``, no copies), stops at the announced size;
writer:  piece SHA-256 against the signed manifest → ``pwrite`` into the slot → checkpoint request
         (the fdatasync and the progress file are written by a ``progress.Checkpointer`` thread);
check:   read each written piece back from the slot into a reused buffer and compare it byte for byte with
         the verified one still in memory; then feed it to the whole-payload SHA-256 (Omaha check).

hashlib (for buffers over 2 KiB), recv, pwrite and pread release the GIL, so the two SHA-256 passes and
the I/O overlap on both cores instead of adding up. The read-back replaces a third SHA-256 pass over the
written slot: comparing with the verified bytes is as strong (every byte the slot returns equals a signed
byte at its offset; every piece is read back, checked before the apply can succeed) and costs a memcmp.
A retry restarts at a piece boundary. Nothing is written outside ``[slot_off, slot_off + slot_len)``.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from update_engine import omaha, payload
from update_engine.errors import ApplyError, Stopped
from update_engine.payload import Manifest
from update_engine.progress import Checkpointer
from update_engine.transfer import Stream, TransferFailed

log = logging.getLogger("obelisk.update")

_END = object()
QUEUE_DEPTH = 2  # pieces fetched ahead of the writer
POOL_SIZE = QUEUE_DEPTH + 4  # + one being read, one being written, two waiting for the digest: 24 MiB at 4 MiB
POOL_BYTES = 24 << 20  # larger chunks get fewer buffers: at the format's largest (16 MiB) one, plus the read-back one
MIN_POOL = 1  # one buffer still works (the reader waits for the check to hand it back), just without overlap

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class Piece:
    pos: int  # offset in the data area
    length: int
    dst: int  # offset in the slot
    sha256: str


def pieces_of(m: Manifest) -> list[Piece]:
    """Every replace operation's chunks, in data order (the manifest parser checked they are contiguous)."""
    out: list[Piece] = []
    for op in m.operations:
        if op.type != payload.OP_REPLACE:
            continue  # refused by policy.check_policy before anything is written
        for j, sha in enumerate(op.chunk_sha256):
            off = j * m.chunk_size
            out.append(Piece(op.data_offset + off, min(m.chunk_size, op.data_length - off), op.dst.offset + off, sha))
    return out


def pool_size(chunk_size: int) -> int:
    return max(MIN_POOL, min(POOL_SIZE, POOL_BYTES // chunk_size))


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None  # not Linux: the final fdatasync does all the flushing
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to begin writing a range out (no durability promise: fdatasync still gives that)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # a failure only leaves it to fdatasync


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def read_back(fd: int, buf: bytearray, n: int, back: bytearray, offset: int, k: int) -> None:
    """Read the piece just written back from the slot and compare it with the verified bytes."""
    with memoryview(back) as mv, mv[:n] as view:
        got = 0
        while got < n:
            r = os.preadv(fd, [view[got:]], offset + got)
            if not r:
                break
            got += r
        # bytearray == memoryview is a memcmp; memoryview == memoryview would compare item by item.
        same = got == n and (buf if n == len(buf) else bytearray(buf[:n])) == view
    if not same:
        raise ApplyError(f"chunk {k} does not read back from the slot as written: check the disk",
                         omaha.ERR_NEW_ROOTFS_VERIFICATION)


class Check:
    """The read-back and the whole-payload SHA-256, in their own thread, over written pieces in order.

    Each buffer goes back to its pool afterwards, so the pools bound the queue. The first failure is kept and
    raised by the writer (``raise_failure``); pieces after it are only returned to their pool."""

    def __init__(self, fd: int, chunk_size: int, whole: hashlib._Hash | None) -> None:
        self.fd, self.whole = fd, whole
        self.back = bytearray(chunk_size)
        self.checked = 0
        self.failure: ApplyError | None = None
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="payload-check")
        self.thread.start()

    def feed(self, buf: bytearray, offset: int, n: int, k: int, pool: queue.Queue) -> None:
        self.q.put((buf, offset, n, k, pool))

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            buf, offset, n, k, pool = item
            try:
                if self.failure is None:
                    read_back(self.fd, buf, n, self.back, offset, k)
                    # Start the piece's writeback now, so the final fdatasync has little left to wait for.
                    start_writeback(self.fd, offset, n)
                    if self.whole is not None:
                        with memoryview(buf) as mv, mv[:n] as view:
                            self.whole.update(view)
                    self.checked += n
            except ApplyError as exc:
                self.failure = exc
            except OSError as exc:
                self.failure = ApplyError(f"cannot read the slot back: {exc.strerror}",
                                          omaha.ERR_NEW_ROOTFS_VERIFICATION)
            finally:
                pool.put(buf)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()


def reader(stream: Stream, m: Manifest, plist: list[Piece], k: int, q: queue.Queue, pool: queue.Queue,
           halt: threading.Event) -> None:
    """Fetch pieces from index ``k`` to the end of the data; hand each (or the error) to the writer."""

    def put(item: object) -> bool:
        while not halt.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        while k < len(plist) and not halt.is_set():
            piece = plist[k]
            n = piece.length
            buf = None
            while buf is None and not halt.is_set():
                with contextlib.suppress(queue.Empty):
                    buf = pool.get(timeout=0.2)
            if buf is None:
                return
            got = 0
            with memoryview(buf) as mv, mv[:n] as view:
                while got < n:
                    r = stream.readinto(view[got:])
                    if not r:
                        break
                    got += r
            if got < n:
                raise TransferFailed(f"payload ended early: {m.data_offset + piece.pos + got} of {m.payload_size} "
                                     "bytes")
            if not put((buf, n, k)):
                return
            k += 1
        if halt.is_set():
            return
        # Stop reading at the announced size; one byte more means the server lied about it.
        if stream.read(1):
            raise ApplyError(f"server sent more than the {m.payload_size} bytes the payload announces",
                             omaha.ERR_PAYLOAD_SIZE)
        put(_END)
    except BaseException as exc:  # noqa: BLE001 - handed to the writer thread, which raises it
        put(exc)


@dataclass
class Retry:
    """How the writer reopens its source after a network failure (``retries`` 0: never)."""

    open: Callable[[int], Stream]  # payload offset -> stream (itself retrying the connection)
    retries: int = 0
    delay: float = 0.0
    sleep: Callable[[float], None] = lambda s: None


class SlotWriter:
    """Writes ``m``'s data into the slot at ``[slot_off, slot_off + slot_len)`` of the open disk ``fd``."""

    def __init__(self, fd: int, slot_off: int, slot_len: int, m: Manifest, *,
                 should_stop: Callable[[], bool] = lambda: False, on_progress: ProgressFn | None = None,
                 checkpointer: Checkpointer | None = None, checkpoint_bytes: int = 16 << 20) -> None:
        self.fd, self.slot_off, self.slot_len, self.m = fd, slot_off, slot_len, m
        self.pieces = pieces_of(m)
        self._starts = [p.pos for p in self.pieces]
        self.should_stop = should_stop
        self.on_progress = on_progress
        self.checkpointer = checkpointer
        self.checkpoint_bytes = checkpoint_bytes

    def resume_at(self, done: int) -> int:
        """``done`` rounded down to a piece boundary: every resumed byte has a signed hash to check against."""
        if done >= self.m.data_size:
            return self.m.data_size
        i = bisect.bisect_right(self._starts, done) - 1
        return self._starts[i] if i >= 0 else 0

    def _index(self, done: int) -> int:
        return bisect.bisect_left(self._starts, done) if done < self.m.data_size else len(self.pieces)

    def rehash(self, done: int, whole: hashlib._Hash | None) -> bool:
        """Feed what a previous run wrote into the payload hash; False if it no longer matches the manifest."""
        for piece in self.pieces[: self._index(done)]:
            data = os.pread(self.fd, piece.length, self.slot_off + piece.dst)
            if len(data) != piece.length or hashlib.sha256(data).hexdigest() != piece.sha256:
                log.warning("the partly written slot changed since the last run: downloading it all again")
                return False
            if whole is not None:
                whole.update(data)
        if self.on_progress:
            self.on_progress("downloading", done, self.m.data_size)
        return True

    def write(self, first: Stream | None, done: int, whole: hashlib._Hash | None, retry: Retry) -> None:
        """Stream from data position ``done`` (``first`` already positioned there, or None to open one)."""
        m = self.m
        total = m.data_size
        attempt = 0
        last_checkpoint = done
        start = done  # what a previous run wrote was re-read and checked by rehash()
        check = Check(self.fd, m.chunk_size, whole)
        saver = self.checkpointer
        try:
            while done < total or first is not None:
                stream = first if first is not None else retry.open(m.data_offset + done)
                first = None
                q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
                pool: queue.Queue = queue.Queue()
                for _ in range(pool_size(m.chunk_size)):
                    pool.put(bytearray(m.chunk_size))
                halt = threading.Event()
                thread = threading.Thread(target=reader, args=(stream, m, self.pieces, self._index(done), q, pool,
                                                               halt), daemon=True, name="payload-reader")
                thread.start()
                try:
                    while True:
                        if self.should_stop():
                            raise Stopped()
                        check.raise_failure()
                        item = q.get()
                        if item is _END:
                            break
                        if isinstance(item, BaseException):
                            raise item
                        buf, n, k = item
                        piece = self.pieces[k]
                        with memoryview(buf) as mv, mv[:n] as view:
                            if hashlib.sha256(view).hexdigest() != piece.sha256:
                                raise ApplyError(f"payload data chunk {k} does not match its signed hash: the "
                                                 "payload is corrupt", omaha.ERR_PAYLOAD_HASH)
                            if piece.dst + n > self.slot_len:  # the manifest was checked; the last line of defence
                                raise ApplyError("write would leave the passive slot", omaha.ERR_POSTINSTALL)
                            pwrite_all(self.fd, view, self.slot_off + piece.dst)
                        check.feed(buf, self.slot_off + piece.dst, n, k, pool)
                        done += n
                        attempt = 0
                        if saver is not None and (done - last_checkpoint >= self.checkpoint_bytes or done == total):
                            saver.request(done)
                            last_checkpoint = done
                        if self.on_progress:
                            self.on_progress("downloading", done, total)
                except TransferFailed:
                    if attempt >= retry.retries:
                        raise
                    attempt += 1
                    retry.sleep(retry.delay)
                finally:
                    halt.set()
                    stream.close()
                    with contextlib.suppress(queue.Empty):
                        while True:  # unblock a reader waiting to put
                            q.get_nowait()
                    thread.join(timeout=10)
            if saver is not None:
                saver.wait()  # the last checkpoint (at the end) is on the disk before the apply goes on
            os.fdatasync(self.fd)
        finally:
            check.close()  # waits for the pieces already fed: ``whole`` then covers exactly the written data
            if saver is not None:
                saver.close()
        check.raise_failure()
        if done != total or check.checked != total - start:  # every byte written was read back and matched
            raise ApplyError(f"only {check.checked} of {total} data bytes were read back from the slot",
                             omaha.ERR_NEW_ROOTFS_VERIFICATION)
