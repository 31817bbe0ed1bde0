"""Stage a payload into the passive USR slot: fetch → verify → write → re-read → postinstall, resumable.

Order (Flatcar's, with the manifest checked before any write, as Android's payload v2 does):
1. read header + signed manifest; verify it against the trusted keys and the policy (app id,
   arch, newer version, sizes agree with the Omaha response, target fits the slot);
2. mark the passive slot unbootable (P=0 T=0 S=0) so a half-written slot can never boot;
3. stream each chunk, check its SHA-256 *before* writing it, write it inside the passive slot's
   extent only, read it back from the slot and compare it with the verified bytes, hash the whole
   payload as it goes (three threads, see ``_stream``); read no byte past the announced size;
4. checkpoint (fdatasync, then an atomic progress file) so a kill resumes with HTTP Range;
5. whole payload: size and SHA-256 against the Omaha response; every data byte was read back and
   matched (the chunk digests cover exactly the manifest's target, docs/payload.md);
6. postinstall: boot data via ``bootloader.loader.stage``, then ``slots.stage_trial`` (S=0 T=1,
   prioritized). The previous version is recorded by the caller (the daemon's state).
Nothing is ever written outside the passive slot's extent, and never to the running slot.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import requests

from bootloader import loader, slots
from obelisk.atomicfile import write_atomic
from obelisk.errors import ObeliskError
from obelisk.signing import PublicKey
from obelisk.versions import compare_versions
from update_engine import omaha, payload
from update_engine.payload import Manifest, PayloadError

log = logging.getLogger("obelisk.update")
PROGRESS_FILE = "apply-progress.json"
MANIFEST_FILE = "apply-manifest.bin"


class ApplyError(ObeliskError, RuntimeError):
    """An apply step failed; ``code`` is the Omaha error code to report, ``str()`` one line for the user."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Stopped(ApplyError):
    def __init__(self) -> None:
        msg = "stopped before the update was staged; it resumes on the next run"
        super().__init__(msg, omaha.ERR_DOWNLOAD_TRANSFER)


@dataclass
class Policy:
    """What the payload must match. None means "not checked" (a manual apply without Omaha)."""

    app_id: str | None = None
    arch: str | None = None
    current_version: str | None = None  # the payload must be newer, unless allow_downgrade
    allow_downgrade: bool = False
    expected_size: int | None = None  # from the Omaha response
    expected_sha256: str | None = None  # hex, from the Omaha response
    expected_version: str | None = None  # from the Omaha response manifest


@dataclass
class Transfer:
    """HTTP behaviour, update_engine's defaults: connect 30 s, abort below 10 B/s for 90 s, 20 retries."""

    connect_timeout: float = 30.0
    low_speed_limit: int = 10  # bytes/s
    low_speed_time: float = 90.0
    retries: int = 20
    retry_delay: float = 2.0
    bandwidth: int = 0  # bytes/s, 0 = unlimited
    proxy: str | None = None
    checkpoint_bytes: int = 16 << 20


@dataclass
class Result:
    disk: str
    slot: str
    index: int
    version: str
    bytes_written: int
    resumed_from: int
    manifest: dict = field(default_factory=dict)


ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


# ---------------------------------------------------------------- sources


class Stream(Protocol):
    def read(self, n: int) -> bytes: ...
    def readinto(self, buf: memoryview) -> int: ...
    def close(self) -> None: ...


class FileStream:
    def __init__(self, path: Path, offset: int) -> None:
        try:
            self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise ApplyError(f"cannot read payload {path}: {exc.strerror}", omaha.ERR_DOWNLOAD_TRANSFER) from None
        self.f.seek(offset)

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def readinto(self, buf: memoryview) -> int:
        return self.f.readinto(buf) or 0

    def close(self) -> None:
        self.f.close()


class HttpStream:
    """A GET from ``offset`` (HTTP Range), with update_engine's slow-retrieval abort and a rate cap."""

    def __init__(self, session: requests.Session, url: str, offset: int, t: Transfer) -> None:
        self.t = t
        # identity: the bytes on the wire must be the payload's bytes (hashes, Range offsets).
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        read_timeout = max(1.0, t.low_speed_time)
        try:
            self.resp = session.get(url, headers=headers, stream=True, timeout=(t.connect_timeout, read_timeout))
        except requests.RequestException as exc:
            raise TransferFailed(f"cannot fetch {url}: {_reason(exc)}") from None
        if self.resp.status_code >= 400:
            code = self.resp.status_code
            self.resp.close()
            raise TransferFailed(f"{url}: HTTP {code}", http_status=code)
        if offset and self.resp.status_code != 206:
            self.resp.close()
            raise TransferFailed(f"{url}: server ignored the Range request (HTTP {self.resp.status_code})")
        self.window_start = time.monotonic()
        self.window_bytes = 0
        self.rate_start = time.monotonic()
        self.rate_bytes = 0

    def read(self, n: int) -> bytes:
        # Through the same http.client response as readinto: mixing urllib3's read() with reads behind its back
        # made urllib3 count those bytes as missing and raise IncompleteRead at the end (a spurious retry).
        fp = getattr(self.resp.raw, "_fp", None)
        try:
            data = fp.read(n) if fp is not None else self.resp.raw.read(n, decode_content=False)
        except Exception as exc:  # urllib3 raises several kinds (timeouts, protocol errors)
            raise TransferFailed(f"download failed: {_reason(exc)}") from None
        self._account(len(data))
        return data

    def readinto(self, buf: memoryview) -> int:
        # http.client's readinto fills our buffer without the copies urllib3's read() makes.
        fp = getattr(self.resp.raw, "_fp", None)
        try:
            if fp is not None and hasattr(fp, "readinto"):
                n = fp.readinto(buf) or 0
                if n == 0 and len(buf) and fp.length not in (None, 0):
                    raise TransferFailed("download failed: connection closed before the announced length")
            else:
                data = self.resp.raw.read(len(buf), decode_content=False)
                n = len(data)
                buf[:n] = data
        except TransferFailed:
            raise
        except Exception as exc:  # http.client / urllib3 raise several kinds (timeouts, incomplete reads)
            raise TransferFailed(f"download failed: {_reason(exc)}") from None
        self._account(n)
        return n

    def _account(self, nbytes: int) -> None:
        now = time.monotonic()
        self.window_bytes += nbytes
        if now - self.window_start >= self.t.low_speed_time:
            if self.window_bytes < self.t.low_speed_limit * (now - self.window_start):
                raise TransferFailed(
                    f"download slower than {self.t.low_speed_limit} B/s for {self.t.low_speed_time:.0f}s")
            self.window_start, self.window_bytes = now, 0
        if self.t.bandwidth:
            self.rate_bytes += nbytes
            ahead = self.rate_bytes / self.t.bandwidth - (now - self.rate_start)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        self.resp.close()


class TransferFailed(ApplyError):
    """A network problem worth a retry from the last checkpoint."""

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message, omaha.ERR_DOWNLOAD_TRANSFER)
        self.http_status = http_status


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "the server stopped sending (timed out)"
    return text.splitlines()[0][:200]


class Source:
    def __init__(self, source: str, t: Transfer) -> None:
        self.source = source
        self.t = t
        self.is_url = source.startswith(("http://", "https://"))
        self.session: requests.Session | None = None
        if self.is_url:
            self.session = requests.Session()
            self.session.trust_env = t.proxy is None
            if t.proxy:
                self.session.proxies = {"http": t.proxy, "https": t.proxy}
        elif not Path(source).is_file():
            raise ApplyError(f"payload {source} does not exist: pass a file or an http(s):// URL",
                             omaha.ERR_DOWNLOAD_TRANSFER)

    def open(self, offset: int) -> Stream:
        if self.session is not None:
            return HttpStream(self.session, self.source, offset, self.t)
        return FileStream(Path(self.source), offset)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


# ---------------------------------------------------------------- progress (resume)


@dataclass
class Progress:
    identity: str  # what is being downloaded: manifest hash + Omaha hash
    disk: str
    index: int
    data_done: int  # bytes of the data area durably written to the slot

    def save(self, state_dir: Path) -> None:
        write_atomic(state_dir / PROGRESS_FILE, json.dumps(asdict(self)).encode())

    @staticmethod
    def load(state_dir: Path) -> Progress | None:
        try:
            obj = json.loads((state_dir / PROGRESS_FILE).read_text())
            return Progress(str(obj["identity"]), str(obj["disk"]), int(obj["index"]), int(obj["data_done"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no progress, or a torn/foreign file: start over, never trust it


def clear_progress(state_dir: Path | None) -> None:
    if state_dir is not None:
        (state_dir / PROGRESS_FILE).unlink(missing_ok=True)
        (state_dir / MANIFEST_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------- checks


def check_policy(m: Manifest, policy: Policy, slot_len: int) -> None:
    """Everything that can be decided from the signed manifest, before any write."""
    if policy.app_id and m.app_id.lower() != policy.app_id.lower():
        raise ApplyError(f"payload is for app {m.app_id}, this host runs {policy.app_id}: wrong release",
                         omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.arch and m.arch != policy.arch:
        raise ApplyError(f"payload is for arch {m.arch}, this host is {policy.arch}: wrong release",
                         omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.current_version and not policy.allow_downgrade and compare_versions(m.version,
                                                                                  policy.current_version) <= 0:
        raise ApplyError(f"payload version {m.version} is not newer than the running {policy.current_version}: "
                         "refusing a downgrade", omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.expected_version and compare_versions(m.version, policy.expected_version) != 0:
        raise ApplyError(f"payload version {m.version} differs from the {policy.expected_version} the server "
                         "announced", omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.expected_size is not None and m.payload_size != policy.expected_size:
        raise ApplyError(f"payload is {m.payload_size} bytes by its manifest, the server announced "
                         f"{policy.expected_size}", omaha.ERR_PAYLOAD_SIZE)
    if m.target_size > slot_len:
        raise ApplyError(f"payload target is {m.target_size} bytes, the slot holds only {slot_len}",
                         omaha.ERR_PAYLOAD_SIZE)
    for op in m.operations:
        if op.type != payload.OP_REPLACE:
            raise ApplyError(f"payload uses operation {op.type}, which this host cannot apply yet",
                             omaha.ERR_PAYLOAD_VERIFICATION)


def _payload_error_code(exc: PayloadError) -> int:
    return omaha.ERR_SIGNATURE if "signature" in str(exc) else omaha.ERR_PAYLOAD_VERIFICATION


# ---------------------------------------------------------------- the apply


@dataclass
class Applier:
    source: str
    disk: Path
    trusted_keys: list[PublicKey]
    slot: int | None = None
    policy: Policy = field(default_factory=Policy)
    transfer: Transfer = field(default_factory=Transfer)
    state_dir: Path | None = None
    on_progress: ProgressFn | None = None
    should_stop: Callable[[], bool] = lambda: False
    on_phase: Callable[[str], None] | None = None  # "downloading", "verifying", "finalizing"

    def _phase(self, name: str) -> None:
        if self.on_phase:
            self.on_phase(name)

    def _target(self) -> tuple[int, int, int]:
        try:
            running = slots.running_index(self.disk)
            index = self.slot
            if index is None:
                if running is None:
                    raise ApplyError(f"{self.disk}: no slot is bootable, so the passive one is unknown: pass --slot",
                                     omaha.ERR_POSTINSTALL)
                index = slots.USR_B if running == slots.USR_A else slots.USR_A
            if index == running:
                raise ApplyError(f"{self.disk}: slot {_name(index)} is the running slot; only the passive slot "
                                 "is ever written", omaha.ERR_POSTINSTALL)
            off, length = slots.slot_extent(self.disk, index)
            if running is not None:
                r_off, r_len = slots.slot_extent(self.disk, running)
                if off < r_off + r_len and r_off < off + length:
                    raise ApplyError(f"{self.disk}: slots overlap in the partition table", omaha.ERR_POSTINSTALL)
        except (slots.SlotError, ValueError) as exc:
            if isinstance(exc, ApplyError):
                raise
            raise ApplyError(f"{self.disk}: {exc}", omaha.ERR_POSTINSTALL) from None
        return index, off, length

    def _read_manifest(self, src: Source) -> tuple[Manifest, Stream]:
        """The verified manifest, and the stream left positioned at the data area."""
        stream = self._open_retrying(src, 0)
        try:
            return payload.read_manifest_stream(stream.read, self.trusted_keys), stream
        except PayloadError as exc:
            stream.close()
            raise ApplyError(str(exc), _payload_error_code(exc)) from None
        except BaseException:
            stream.close()
            raise

    def _open_retrying(self, src: Source, offset: int) -> Stream:
        attempt = 0
        while True:
            try:
                return src.open(offset)
            except TransferFailed as exc:
                # A 4xx is the server's considered answer: retrying the same URL will not help.
                if (exc.http_status and 400 <= exc.http_status < 500) or attempt >= self.transfer.retries:
                    raise
                attempt += 1
                self._sleep(self.transfer.retry_delay)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.should_stop():
                raise Stopped()
            time.sleep(min(0.2, end - time.monotonic()))

    slot_name: str = ""  # set once the target slot is known

    def run(self) -> Result:
        index, slot_off, slot_len = self._target()
        self.slot_name = _name(index)
        src = Source(self.source, self.transfer)
        try:
            return self._run(src, index, slot_off, slot_len)
        finally:
            src.close()

    def _run(self, src: Source, index: int, slot_off: int, slot_len: int) -> Result:
        self._phase("downloading")
        m, first = self._read_manifest(src)
        try:
            check_policy(m, self.policy, slot_len)
            identity = hashlib.sha256(m.raw + (self.policy.expected_sha256 or "").encode()).hexdigest()
            done = self._resume_point(identity, index, m)
        except BaseException:
            first.close()
            raise
        if done:
            first.close()
            first = None
        # Beyond here the passive slot's content is about to change: it must never be chosen to boot.
        try:
            with _clean_slot_errors():
                slots.mark_unbootable(self.disk, index)
            if self.state_dir is not None:
                write_atomic(self.state_dir / MANIFEST_FILE, m.raw)
                Progress(identity, str(self.disk), index, done).save(self.state_dir)
            fd = os.open(self.disk, os.O_RDWR)
        except BaseException:
            if first is not None:
                first.close()
            raise
        try:
            # The whole-payload SHA-256 is only worth its pass over the data when the server announced one.
            want = self.policy.expected_sha256
            whole = hashlib.sha256(m.raw) if want else None
            # Resuming: the payload's prefix is the manifest plus what is on the slot already, and each of
            # those chunks is re-read and re-checked against the signed manifest before it is trusted.
            if not self._rehash_written(fd, slot_off, m, done, whole):
                done, whole = 0, (hashlib.sha256(m.raw) if want else None)  # the slot changed: start over
            self._stream(src, first, fd, slot_off, slot_len, m, identity, index, done, whole)
            self._phase("verifying")
            if want and (whole is None or whole.hexdigest() != want.lower()):
                raise ApplyError("payload SHA-256 differs from the one the update server announced",
                                 omaha.ERR_PAYLOAD_HASH)
        finally:
            os.close(fd)
        self._phase("finalizing")
        try:
            loader.stage(self.disk, index, root_hash=m.verity_root_hash, hash_offset=m.hash_offset, version=m.version)
            slots.stage_trial(self.disk, index)
        except (OSError, ValueError) as exc:
            raise ApplyError(f"postinstall failed: {exc}", omaha.ERR_POSTINSTALL) from None
        clear_progress(self.state_dir)
        return Result(str(self.disk), _name(index), index, m.version, m.target_size, done, m.summary())

    def _resume_point(self, identity: str, index: int, m: Manifest) -> int:
        if self.state_dir is None:
            return 0
        p = Progress.load(self.state_dir)
        try:
            stored = (self.state_dir / MANIFEST_FILE).read_bytes()
        except OSError:
            stored = b""
        if (p is None or p.identity != identity or p.index != index or stored != m.raw
                or os.path.realpath(p.disk) != os.path.realpath(self.disk)):
            clear_progress(self.state_dir)
            return 0
        # Only whole chunks count, so every resumed byte has a signed hash to check against.
        return min(p.data_done - p.data_done % m.chunk_size, m.data_size)

    def _rehash_written(self, fd: int, slot_off: int, m: Manifest, done: int, whole: hashlib._Hash | None) -> bool:
        """Feed what a previous run wrote into the payload hash; False if it no longer matches the manifest."""
        op = m.operations[0]
        pos = 0
        while pos < done:
            n = min(m.chunk_size, done - pos)
            data = os.pread(fd, n, slot_off + op.dst.offset + pos)
            if len(data) != n or hashlib.sha256(data).hexdigest() != op.chunk_sha256[pos // m.chunk_size]:
                log.warning("the partly written slot changed since the last run: downloading it all again")
                return False
            if whole is not None:
                whole.update(data)
            pos += n
        if self.on_progress:
            self.on_progress("downloading", done, m.data_size)
        return True

    def _stream(self, src: Source, first: Stream | None, fd: int, slot_off: int, slot_len: int, m: Manifest,
                identity: str, index: int, done: int, whole: hashlib._Hash | None) -> None:
        """A pipeline of three threads over a fixed pool of chunk buffers (memory stays flat whatever the size):

        reader:  socket → buffer (``readinto``, no copies), stops at the announced size;
        this:    chunk SHA-256 against the signed manifest → ``pwrite`` into the slot → checkpoint request
                 (the fdatasync and the progress file are written by a ``_Checkpointer`` thread);
        check:   read each written chunk back from the slot into a reused buffer and compare it byte for byte with
                 the verified one still in memory; then feed it to the whole-payload SHA-256 (Omaha check).

        hashlib (for buffers over 2 KiB), recv, pwrite and pread release the GIL, so the two SHA-256 passes and
        the I/O overlap on both cores instead of adding up. The read-back replaces a third SHA-256 pass over the
        written slot: comparing with the verified bytes is as strong (every byte the slot returns equals a signed
        byte at its offset; every chunk is read back, checked before the apply can succeed) and costs a memcmp.
        A retry restarts at a chunk boundary."""
        op = m.operations[0]
        total = m.data_size
        attempt = 0
        last_checkpoint = done
        start = done  # what a previous run wrote was re-read and checked by _rehash_written
        check = _Check(fd, slot_off + op.dst.offset, m.chunk_size, whole)
        saver = _Checkpointer(fd, self.state_dir, identity, str(self.disk), index) if self.state_dir else None
        try:
            while done < total or first is not None:
                stream = first if first is not None else self._open_retrying(src, m.data_offset + done)
                first = None
                q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
                pool: queue.Queue = queue.Queue()
                for _ in range(POOL_SIZE):
                    pool.put(bytearray(m.chunk_size))
                halt = threading.Event()
                reader = threading.Thread(target=_reader, args=(stream, m, done, q, pool, halt), daemon=True,
                                          name="payload-reader")
                reader.start()
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
                        buf, n = item
                        k = done // m.chunk_size
                        with memoryview(buf) as mv, mv[:n] as view:
                            if hashlib.sha256(view).hexdigest() != op.chunk_sha256[k]:
                                raise ApplyError(f"payload data chunk {k} does not match its signed hash: the "
                                                 "payload is corrupt", omaha.ERR_PAYLOAD_HASH)
                            dst = op.dst.offset + done
                            if dst + n > slot_len:  # the manifest was checked; this is the last line of defence
                                raise ApplyError("write would leave the passive slot", omaha.ERR_POSTINSTALL)
                            _pwrite_all(fd, view, slot_off + dst)
                        check.feed(buf, done, n, pool)
                        done += n
                        attempt = 0
                        if saver is not None and (done - last_checkpoint >= self.transfer.checkpoint_bytes
                                                  or done == total):
                            saver.request(done)
                            last_checkpoint = done
                        if self.on_progress:
                            self.on_progress("downloading", done, total)
                except TransferFailed:
                    if not src.is_url or attempt >= self.transfer.retries:
                        raise
                    attempt += 1
                    self._sleep(self.transfer.retry_delay)
                finally:
                    halt.set()
                    stream.close()
                    with contextlib.suppress(queue.Empty):
                        while True:  # unblock a reader waiting to put
                            q.get_nowait()
                    reader.join(timeout=10)
            if saver is not None:
                saver.wait()  # the last checkpoint (at the end) is on the disk before the apply goes on
            os.fdatasync(fd)
        finally:
            check.close()  # waits for the chunks already fed: ``whole`` then covers exactly the written data
            if saver is not None:
                saver.close()
        check.raise_failure()
        if done != total or check.checked != total - start:  # every byte written was read back and matched
            raise ApplyError(f"only {check.checked} of {total} data bytes were read back from the slot",
                             omaha.ERR_NEW_ROOTFS_VERIFICATION)


_END = object()
QUEUE_DEPTH = 2  # chunks fetched ahead of the writer
POOL_SIZE = QUEUE_DEPTH + 4  # + one being read, one being written, two waiting for the digest: 24 MiB at 4 MiB


class _Checkpointer:
    """Checkpoints in their own thread, so the writer goes on fetching and writing during the fdatasync.

    A checkpoint for ``done`` bytes is requested only after those bytes were written (pwrite returned), and its
    fdatasync runs before its progress file is saved: progress never claims bytes that are not on the disk.
    At most one checkpoint is in flight; the next request waits for it, so progress lags the writer by at
    most one checkpoint interval (a kill loses at most two intervals of download)."""

    def __init__(self, fd: int, state_dir: Path, identity: str, disk: str, index: int) -> None:
        self.fd, self.state_dir, self.identity, self.disk, self.index = fd, state_dir, identity, disk, index
        self.failure: BaseException | None = None
        self.thread: threading.Thread | None = None

    def _save(self, done: int) -> None:
        try:
            os.fdatasync(self.fd)
            Progress(self.identity, self.disk, self.index, done).save(self.state_dir)
        except BaseException as exc:  # noqa: BLE001 - raised in the writer by wait()
            self.failure = exc

    def request(self, done: int) -> None:
        self.wait()
        self.thread = threading.Thread(target=self._save, args=(done,), daemon=True, name="payload-checkpoint")
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.failure is not None:
            exc, self.failure = self.failure, None
            raise exc

    def close(self) -> None:
        with contextlib.suppress(BaseException):
            self.wait()


class _Check:
    """The read-back and the whole-payload SHA-256, in their own thread, over written chunks in order.

    Each buffer goes back to its pool afterwards, so the pools bound the queue. The first failure is kept and
    raised by the writer (``raise_failure``); chunks after it are only returned to their pool."""

    def __init__(self, fd: int, data_start: int, chunk_size: int, whole: hashlib._Hash | None) -> None:
        self.fd, self.data_start, self.whole = fd, data_start, whole
        self.back = bytearray(chunk_size)
        self.checked = 0
        self.failure: ApplyError | None = None
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="payload-check")
        self.thread.start()

    def feed(self, buf: bytearray, pos: int, n: int, pool: queue.Queue) -> None:
        self.q.put((buf, pos, n, pool))

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            buf, pos, n, pool = item
            try:
                if self.failure is None:
                    _read_back(self.fd, buf, n, self.back, self.data_start + pos, pos // len(self.back))
                    # Start the chunk's writeback now, so the final fdatasync has little left to wait for.
                    _start_writeback(self.fd, self.data_start + pos, n)
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


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to begin writing a range out (no durability promise: fdatasync still gives that)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # a failure only leaves it to fdatasync


def _read_back(fd: int, buf: bytearray, n: int, back: bytearray, offset: int, k: int) -> None:
    """Read the chunk just written back from the slot and compare it with the verified bytes."""
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


def _reader(stream: Stream, m: Manifest, done: int, q: queue.Queue, pool: queue.Queue, halt: threading.Event) -> None:
    """Fetch chunks from ``done`` to the end of the data; hand each (or the error) to the writer."""

    def put(item: object) -> bool:
        while not halt.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    total = m.data_size
    try:
        while done < total and not halt.is_set():
            n = min(m.chunk_size - done % m.chunk_size, total - done)
            buf = None
            while buf is None and not halt.is_set():
                with contextlib.suppress(queue.Empty):
                    buf = pool.get(timeout=0.2)
            if buf is None:
                return
            got = 0
            with memoryview(buf) as mv, mv[:n] as view:
                while got < n:
                    k = stream.readinto(view[got:])
                    if not k:
                        break
                    got += k
            if got < n:
                raise TransferFailed(f"payload ended early: {m.data_offset + done + got} of {m.payload_size} bytes")
            if not put((buf, n)):
                return
            done += n
        if halt.is_set():
            return
        # Stop reading at the announced size; one byte more means the server lied about it.
        if stream.read(1):
            raise ApplyError(f"server sent more than the {m.payload_size} bytes the payload announces",
                             omaha.ERR_PAYLOAD_SIZE)
        put(_END)
    except BaseException as exc:  # noqa: BLE001 - handed to the writer thread, which raises it
        put(exc)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _name(index: int) -> str:
    return {slots.USR_A: "A", slots.USR_B: "B"}.get(index, str(index))


class _clean_slot_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:  # noqa: ANN001
        if exc is not None and isinstance(exc, (ValueError, OSError)) and not isinstance(exc, ApplyError):
            raise ApplyError(f"cannot change slot attributes: {exc}", omaha.ERR_POSTINSTALL) from None
        return False


def apply(source: str, disk: Path, trusted_keys: list[PublicKey], **kw: object) -> Result:
    """Convenience wrapper: ``Applier(source, disk, trusted_keys, **kw).run()``."""
    return Applier(source, Path(disk), trusted_keys, **kw).run()  # type: ignore[arg-type]
