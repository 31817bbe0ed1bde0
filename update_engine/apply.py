"""Stage a payload into the passive USR slot: fetch → verify → write → re-read → postinstall, resumable.

Order (Flatcar's, with the manifest checked before any write, as Android's payload v2 does); each step
lives in its own module and this one only runs them in order:

1. lock the disk for this apply (``disklock``) and choose the slot to write (``target``: never the
   running or last good slot);
2. read header + signed manifest from the source (``transfer``); verify it against the trusted keys
   (``payload``) and the policy (``policy``: app id, arch, newer version, sizes agree with the Omaha
   response, target fits the slot);
3. find what a previous run of the same payload left (``progress``), then mark the slot unbootable
   (P=0 T=0 S=0) so a half-written slot can never boot;
4. stream the data into the slot, each chunk checked before it is written and read back after
   (``slotwriter``), checkpointing so a kill resumes with HTTP Range;
5. whole payload: size and SHA-256 against the Omaha response;
6. postinstall (``postinstall``): boot data, then S=0 T=1, prioritized.
Nothing is ever written outside the passive slot's extent, and never to the slot to keep.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bootloader import layout, slots
from obelisk.errors import ObeliskError
from obelisk.inputs import InputFileError, check_input
from obelisk.signing import PublicKey
from update_engine import chunkplan, disklock, installed, omaha, payload, progress, target
from update_engine.adaptive import AdaptiveWriter, Figures, publish
from update_engine.errors import ApplyError, Stopped, payload_failure
from update_engine.payload import Manifest, PayloadError
from update_engine.policy import Overrides, Policy, check_policy, resolve
from update_engine.postinstall import postinstall
from update_engine.progress import MANIFEST_FILE, PROGRESS_FILE, Checkpointer, Progress, clear_progress
from update_engine.rangefetch import RangeFetcher, RangeUnusable
from update_engine.slotwriter import Retry, SlotWriter
from update_engine.transfer import Retrier, Source, Stream, Transfer, TransferFailed

T = TypeVar("T")

# The names other code and tests know this module by.
__all__ = ["MANIFEST_FILE", "PROGRESS_FILE", "ApplyError", "Applier", "Policy", "Progress", "Result", "Stopped",
           "Transfer", "TransferFailed", "apply", "check_policy", "clear_progress"]

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class Result:
    disk: str
    slot: str
    index: int
    version: str
    bytes_written: int
    resumed_from: int
    manifest: dict = field(default_factory=dict)
    staged: bool = True  # False: a dry run, everything checked and nothing written
    # Bytes of the target reused from the host, fetched, saved; mode "adaptive" or "full" (docs/adaptive.md).
    transfer: dict = field(default_factory=dict)


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
    urls_only: bool = False  # the daemon: sources come from an Omaha answer, never a local path
    lock_dir: Path | None = None  # where the per-disk apply lock lives (default: disklock.default_lock_dir())
    slot_name: str = ""  # set once the target slot is known
    # A manual apply: the policy comes from what the target runs (``installed``), these flags over it;
    # each override (or check left out) is said through ``on_note``.
    overrides: Overrides | None = None
    on_note: Callable[[str], None] | None = None
    dry_run: bool = False  # verify the manifest and the policy, then stop before any write
    # Adaptive updates (docs/adaptive.md): with a chunk index in the manifest, copy what the host has and
    # fetch only the rest by Range. Off by default: every payload is read front to back, as before.
    adaptive: bool = False
    on_figures: Callable[[Figures], None] | None = None  # reused / fetched / saved, as they grow
    _notes: list[str] = field(default_factory=list, init=False, repr=False)

    def _phase(self, name: str) -> None:
        if self.on_phase:
            self.on_phase(name)

    def run(self) -> Result:
        try:
            check_input(self.disk, "disk", block_device=True)  # a FIFO would block every read of the GPT
        except InputFileError as exc:
            raise ApplyError(str(exc), omaha.ERR_POSTINSTALL) from None
        with disklock.exclusive(self.disk, self.lock_dir):
            tgt = target.choose(self.disk, self.slot)
            self.slot_name = tgt.name
            if self.overrides is not None:
                have = installed.of_target(self.disk, tgt, booted=target.is_boot_disk(self.disk))
                self.policy, self._notes = resolve(have, self.overrides)
            src = Source(self.source, self.transfer, local_ok=not self.urls_only)
            try:
                return self._run(src, tgt)
            finally:
                src.close()

    def _read_manifest_ranged(self, src: Source) -> Manifest | None:
        """Header and manifest by two Range requests (nothing of the data area is sent); None when the
        server does not answer ranges as asked (the caller then reads the payload front to back)."""
        fetcher = RangeFetcher(src.source, self.policy.expected_size, self.transfer, retries=self.transfer.retries)
        try:
            head = fetcher.fetch(0, payload.HEADER_SIZE)
            mlen, slen = payload.parse_header(head)
            rest = fetcher.fetch(payload.HEADER_SIZE, mlen + slen)
            return payload.verify_signed(head, rest[:mlen], rest[mlen:], self.trusted_keys)
        except RangeUnusable as exc:
            self._say(f"{exc}: downloading the whole payload")
            return None
        except PayloadError as exc:
            raise payload_failure(exc) from None
        finally:
            fetcher.close()

    def _say(self, note: str) -> None:
        if self.on_note:
            self.on_note(note)

    def _read_manifest(self, retrier: Retrier, src: Source) -> tuple[Manifest, Stream | None]:
        """The verified manifest, and the stream left positioned at the data area (None: not opened yet)."""
        if self.adaptive and src.is_url and not self.dry_run:
            m = self._read_manifest_ranged(src)
            if m is not None:
                return m, None
        return _read_head(retrier, src, lambda stream: payload.read_manifest_stream(stream.read, self.trusted_keys))

    def _run(self, src: Source, tgt: target.Target) -> Result:
        retrier = Retrier(self.transfer, self.should_stop)
        self._phase("downloading")
        m, first = self._read_manifest(retrier, src)
        try:
            check_policy(m, self.policy, tgt.length)
            for note in self._notes:  # said once the payload is accepted: a refusal stays one line
                if self.on_note:
                    self.on_note(note)
            if self.dry_run:
                if first is not None:
                    first.close()
                return Result(str(self.disk), tgt.name, tgt.index, m.version, 0, 0, m.summary(), staged=False)
            identity = hashlib.sha256(m.raw + (self.policy.expected_sha256 or "").encode()).hexdigest()
            done = 0
            if self.state_dir is not None:
                done = progress.resumable(self.state_dir, identity, self.disk, tgt.index, m.raw)
        except BaseException:
            if first is not None:
                first.close()
            raise
        # Beyond here the passive slot's content is about to change: it must never be chosen to boot.
        try:
            target.make_unbootable(self.disk, tgt.index)
            chunkplan.drop_index(self.state_dir, tgt.index)  # its saved index no longer says what it holds
            fd = self._open_disk()
        except BaseException:
            if first is not None:
                first.close()
            raise
        figures: Figures | None = None
        try:
            tried = self.adaptive and chunkplan.adaptive_ok(m)
            if tried:
                figures = self._adaptive(src, tgt, fd, m, identity, done)
            if figures is None:
                if tried:
                    done = 0  # the slot holds chunks of the plan, not a prefix: start the stream over
                if first is None:
                    first = self._open_data(retrier, src, m)
                figures = self._full(src, retrier, tgt, fd, m, identity, done, first)
                first = None
        finally:
            if first is not None:
                first.close()
            os.close(fd)
        self._phase("finalizing")
        postinstall(self.disk, tgt.index, m)
        clear_progress(self.state_dir)
        if m.index is not None and self.state_dir is not None:
            chunkplan.save_index(self.state_dir, tgt.index, m)
        publish(figures)
        return Result(str(self.disk), tgt.name, tgt.index, m.version, m.target_size, figures.resumed_from,
                      m.summary(), transfer=figures.to_json())

    def _open_data(self, retrier: Retrier, src: Source, m: Manifest) -> Stream:
        """A stream at the data area read from the payload's first byte (no Range: the server may ignore it)."""
        got, stream = _read_head(retrier, src, lambda stream: payload._read_exact(stream.read, m.data_offset,
                                                                                  "manifest"))
        if got != m.raw:
            stream.close()
            raise ApplyError("the payload changed on the server during the update (its manifest differs)",
                             omaha.ERR_DOWNLOAD_TRANSFER)
        return stream

    def _sources(self, tgt: target.Target, fd: int, m: Manifest) -> list[chunkplan.LocalSource]:
        """What the host has: the slot it keeps (saved index or indexed now), and the slot being written."""
        assert m.index is not None
        out = []
        for index in (tgt.keep, tgt.index):
            if index is None:
                continue
            try:
                off, length = slots.slot_extent(self.disk, index)
            except (ObeliskError, OSError):
                continue
            written = index == tgt.index
            saved = None if written else chunkplan.load_index(self.state_dir, index, m.index.chunker)
            name = f"slot {layout.name_of(index)}" + (" (being written)" if written else "")
            src = chunkplan.slot_source(name, fd, off, length, written=written, saved=saved)
            if src is not None:
                out.append(src)
        return out

    def _adaptive(self, src: Source, tgt: target.Target, fd: int, m: Manifest, identity: str,
                  done: int) -> Figures | None:
        """Stage chunk by chunk; None when reading the payload front to back is the better (or only) way."""
        plan = chunkplan.make_plan(m, self._sources(tgt, fd, m))
        if not plan.worth_it:
            self._say(f"the host has {plan.reused} of {plan.total} target bytes: downloading the whole payload")
            return None
        self._say(f"adaptive update: reusing {plan.reused:,} bytes, fetching {plan.fetched:,} in "
                  f"{plan.requests} range requests")
        fetcher = RangeFetcher(src.source, m.payload_size, self.transfer,
                               retries=self.transfer.retries if src.is_url else 0)
        saver = None
        if self.state_dir is not None:
            progress.start(self.state_dir, m.raw, Progress(identity, str(self.disk), tgt.index, 0))
            saver = Checkpointer(fd, self.state_dir, identity, str(self.disk), tgt.index)
        want = self.policy.expected_sha256
        whole = hashlib.sha256(m.raw) if want else None
        writer = AdaptiveWriter(fd, tgt.offset, tgt.length, m, fetcher, should_stop=self.should_stop,
                                on_progress=self.on_progress, on_figures=self.on_figures, checkpointer=saver,
                                checkpoint_bytes=self.transfer.checkpoint_bytes)
        try:
            figures = writer.write(plan, whole)
        except RangeUnusable as exc:
            self._say(f"{exc}: downloading the whole payload instead")
            return None
        finally:
            fetcher.close()
        self._phase("verifying")
        if want and (whole is None or whole.hexdigest() != want.lower()):
            raise ApplyError("payload SHA-256 differs from the one the update server announced",
                             omaha.ERR_PAYLOAD_HASH)
        # A resumed run (the progress file says so) found what it had written in place; chunks that were in
        # place for another reason (an older image in the passive slot) are reuse, not a resume.
        figures.resumed_from = min(done, figures.in_place)
        return figures

    def _full(self, src: Source, retrier: Retrier, tgt: target.Target, fd: int, m: Manifest, identity: str,
              done: int, first: Stream) -> Figures:
        """Read the payload front to back (the path every host had before chunk indexes)."""
        try:
            saver = None
            if self.state_dir is not None:
                saver = Checkpointer(fd, self.state_dir, identity, str(self.disk), tgt.index)
            writer = SlotWriter(fd, tgt.offset, tgt.length, m, should_stop=self.should_stop,
                                on_progress=self.on_progress, checkpointer=saver,
                                checkpoint_bytes=self.transfer.checkpoint_bytes)
            done = writer.resume_at(done)
            if done:
                first.close()
                first = None
            if self.state_dir is not None:
                progress.start(self.state_dir, m.raw, Progress(identity, str(self.disk), tgt.index, done))
            # The whole-payload SHA-256 is only worth its pass over the data when the server announced one.
            want = self.policy.expected_sha256
            whole = hashlib.sha256(m.raw) if want else None
            # Resuming: the payload's prefix is the manifest plus what is on the slot already, and each of
            # those chunks is re-read and re-checked against the signed manifest before it is trusted.
            if not writer.rehash(done, whole):
                done, whole = 0, (hashlib.sha256(m.raw) if want else None)  # the slot changed: start over
            retry = Retry(open=lambda offset: retrier.open(src, offset),
                          retries=self.transfer.retries if src.is_url else 0,
                          delay=self.transfer.retry_delay, sleep=retrier.sleep)
            resumed_from = done
            stream, first = first, None  # the writer closes it
            writer.write(stream, done, whole, retry)
            self._phase("verifying")
            if want and (whole is None or whole.hexdigest() != want.lower()):
                raise ApplyError("payload SHA-256 differs from the one the update server announced",
                                 omaha.ERR_PAYLOAD_HASH)
        finally:
            if first is not None:
                first.close()
        return Figures(total=m.target_size, fetched=m.target_size - resumed_from, mode="full",
                       resumed_from=resumed_from)

    def _open_disk(self) -> int:
        try:
            return os.open(self.disk, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ApplyError(f"cannot open {self.disk} for writing: {exc.strerror}", omaha.ERR_POSTINSTALL) from None


def apply(source: str, disk: Path, trusted_keys: list[PublicKey], **kw: object) -> Result:
    """Convenience wrapper: ``Applier(source, disk, trusted_keys, **kw).run()``."""
    return Applier(source, Path(disk), trusted_keys, **kw).run()  # type: ignore[arg-type]


def _read_head(retrier: Retrier, src: Source, read: Callable[[Stream], T]) -> tuple[T, Stream]:
    """Open ``src`` from its first byte and ``read`` its head: (what was read, the stream after it). The
    stream is closed if the read fails; a payload error becomes the apply's transfer failure."""
    stream = retrier.open(src, 0)
    try:
        return read(stream), stream
    except PayloadError as exc:
        stream.close()
        raise payload_failure(exc) from None
    except BaseException:
        stream.close()
        raise
