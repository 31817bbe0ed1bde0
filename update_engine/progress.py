"""Resume files: how much of which payload is durably on which slot (`<state dir>/apply-progress.json`).

Beside it, `apply-manifest.bin` holds the signed header + manifest of the payload being written, so a
later run resumes only the very same payload (same manifest bytes, same Omaha SHA-256, same disk and
slot). Both are written atomically; a torn or foreign file means "start over", never trust it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from obelisk.atomicfile import write_atomic

PROGRESS_FILE = "apply-progress.json"
MANIFEST_FILE = "apply-manifest.bin"
FILE_MODE = 0o600  # the state dir is root's; these say what is being staged where


@dataclass
class Progress:
    identity: str  # what is being downloaded: manifest hash + Omaha hash
    disk: str
    index: int
    data_done: int  # bytes of the data area durably written to the slot

    def save(self, state_dir: Path) -> None:
        write_atomic(state_dir / PROGRESS_FILE, json.dumps(asdict(self)).encode(), mode=FILE_MODE)

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


def start(state_dir: Path, manifest_raw: bytes, progress: Progress) -> None:
    """Record what is about to be written (before the first byte reaches the slot)."""
    write_atomic(state_dir / MANIFEST_FILE, manifest_raw, mode=FILE_MODE)
    progress.save(state_dir)


def resumable(state_dir: Path, identity: str, disk: Path, index: int, manifest_raw: bytes) -> int:
    """Data bytes a previous run of this very payload left on this slot (0, and the files cleared, if none)."""
    p = Progress.load(state_dir)
    try:
        stored = (state_dir / MANIFEST_FILE).read_bytes()
    except OSError:
        stored = b""
    if (p is None or p.identity != identity or p.index != index or stored != manifest_raw
            or os.path.realpath(p.disk) != os.path.realpath(disk)):
        clear_progress(state_dir)
        return 0
    return max(0, p.data_done)


class Checkpointer:
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
