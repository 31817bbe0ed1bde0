"""Write a disk image onto a target disk, then fit its GPT to the disk and put a config in OEM.

The order keeps a failure from leaving a disk that looks installed:
1. the first MiB of the target (protective MBR and primary GPT) and its last MiB (the backup GPT
   of whatever was there) are zeroed, so no tool finds the old table any more;
2. the image is streamed in, all but its first MiB (kept in memory), and flushed;
3. the config is written into the OEM file system (debugfs -w at the partition's offset: no mount);
4. only then the image's first MiB goes in, flushed: from here the disk has a valid GPT;
5. the backup GPT moves from the image's end to the disk's end (``gpt.repair(move_backup=True)``).
A stream that breaks off or fails its checksum stops before step 4: the disk then holds no
partition table, never a half-written one that looks whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from bootloader import gpt
from obelisk import diskio, tools
from obelisk.errors import ObeliskError

HEAD = 1024 * 1024  # the image's first partition starts at 1 MiB: PMBR + primary GPT live below
TAIL = 1024 * 1024  # the old backup GPT is in the disk's last 33 sectors; a MiB covers 4Kn disks too
BLOCK = 4 * 1024 * 1024
OEM_LABEL = "OEM"
EXT4_MAGIC = 0xEF53
BLKRRPART = 0x125F  # ioctl: make the kernel read the partition table again

Progress = Callable[[int, int], None]  # (bytes done, total)


class InstallError(ObeliskError):
    """The install could not be done; the message says in which state it left the disk."""


@dataclass(frozen=True)
class Written:
    sha256: str
    size: int


def _open_target(disk: Path) -> int:
    flags = os.O_WRONLY | os.O_CLOEXEC
    try:
        if stat.S_ISBLK(os.stat(disk).st_mode):
            flags |= os.O_EXCL  # while we write, the kernel refuses a mount of it (and other exclusive openers)
        return os.open(disk, flags)
    except OSError as exc:
        raise InstallError(f"{disk}: cannot open for writing: {exc.strerror}") from None


def _size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def stream_image(chunks: Iterable[bytes], disk: Path, total: int, progress: Progress | None = None,
                 expect_sha256: str | None = None) -> tuple[Written, bytes]:
    """Steps 1-2: the image's bytes onto ``disk`` except its first MiB, which is returned (not written).

    Raises InstallError when the stream is shorter or longer than ``total`` or its SHA-256 is not
    ``expect_sha256``; the disk then has no partition table.
    """
    fd = _open_target(disk)
    digest = hashlib.sha256()
    head = bytearray()
    done = 0  # bytes of the image taken from the stream
    try:
        end = _size(fd)
        diskio.pwrite_all(fd, bytes(min(HEAD, end)), 0)
        if end > HEAD:
            tail = max(HEAD, end - TAIL)
            diskio.pwrite_all(fd, bytes(end - tail), tail)
        diskio.fsync(fd)
        pending = bytearray()
        for chunk in chunks:
            digest.update(chunk)
            if done + len(chunk) > total:
                raise InstallError(f"the image is longer than the {total:,} bytes its release names; the disk "
                                   "holds no partition table now")
            if done < HEAD:
                take = min(len(chunk), HEAD - done)
                head += chunk[:take]
                chunk, done = chunk[take:], done + take
            pending += chunk
            done += len(chunk)
            if len(pending) >= BLOCK:
                diskio.pwrite_all(fd, pending, done - len(pending))
                pending = bytearray()
                if progress:
                    progress(done, total)
        if pending:
            diskio.pwrite_all(fd, pending, done - len(pending))
        diskio.fsync(fd)
        if progress:
            progress(done, total)
    except OSError as exc:
        raise InstallError(f"{disk}: write failed after {done:,} bytes: {exc.strerror or exc}; the disk holds no "
                           "partition table now") from None
    finally:
        os.close(fd)
    if done != total:
        raise InstallError(f"the image ended after {done:,} of {total:,} bytes (truncated); the disk holds no "
                           "partition table now — nothing on it boots")
    got = digest.hexdigest()
    if expect_sha256 and got != expect_sha256:
        raise InstallError(f"the image's SHA-256 is {got[:16]}..., its signed release says {expect_sha256[:16]}...; "
                           "the disk holds no partition table now — nothing on it boots")
    return Written(got, done), bytes(head)


def image_table(head: bytes, size: int) -> gpt.GptTable:
    """The GPT of an image of ``size`` bytes whose first MiB is ``head`` (read by the GPT code, not by us)."""
    with tempfile.NamedTemporaryFile(prefix="obelisk-install-head-") as f:
        f.write(head)
        f.truncate(size)  # sparse: the backup is absent, the primary says where everything is
        f.flush()
        return gpt.read_table(Path(f.name))


def oem_partition(table: gpt.GptTable) -> gpt.GptPartition:
    found = [p for p in table.partitions if p.name == OEM_LABEL]
    if len(found) != 1:
        raise InstallError(f"the image has {len(found)} partitions named {OEM_LABEL}: it is not an obelisk disk image")
    return found[0]


def ext4_label(disk: Path, offset: int) -> str | None:
    """The volume label of the ext2/3/4 file system at ``offset`` of ``disk``, None when there is none."""
    with open(disk, "rb") as f:
        f.seek(offset + 1024)
        sb = f.read(1024)
    if len(sb) < 136 or struct.unpack_from("<H", sb, 56)[0] != EXT4_MAGIC:
        return None
    return sb[120:136].split(b"\0", 1)[0].decode(errors="replace")


def _debugfs(disk: Path, offset: int, commands: str, *, write: bool) -> tools.Result:
    with tempfile.NamedTemporaryFile("w", prefix="obelisk-debugfs-", suffix=".cmd") as cmd:
        cmd.write(commands)
        cmd.flush()
        # `?offset=` is e2fsprogs' io option: the file system at that byte of the disk.
        argv = ["debugfs", *(["-w"] if write else []), "-f", cmd.name, f"{disk}?offset={offset}"]
        return tools.run(argv, timeout=120)


def write_oem_file(disk: Path, offset: int, name: str, data: bytes) -> None:
    """Put ``data`` as /``name`` (root-owned, mode 0600: configs carry secrets) in the ext4 file system at
    ``offset``; read back to prove it, since debugfs reports a failed command but still exits 0."""
    label = ext4_label(disk, offset)
    if label != OEM_LABEL:
        raise InstallError(f"{disk}: no ext4 file system labelled {OEM_LABEL} at byte {offset} (found "
                           f"{'none' if label is None else repr(label)})")
    with tempfile.TemporaryDirectory(prefix="obelisk-oem-") as tmp:
        src = Path(tmp) / name
        src.write_bytes(data)
        src.chmod(0o600)
        _debugfs(disk, offset, f"rm /{name}\nwrite {src} /{name}\nsif /{name} uid 0\nsif /{name} gid 0\n"
                               f"sif /{name} mode 0100600\n", write=True)
    back = read_oem_file(disk, offset, name)
    if back != data:
        raise InstallError(f"{disk}: /{name} in {OEM_LABEL} does not read back as written (debugfs failed)")


def read_oem_file(disk: Path, offset: int, name: str) -> bytes | None:
    with tempfile.TemporaryDirectory(prefix="obelisk-oem-") as tmp:
        out = Path(tmp) / "out"
        _debugfs(disk, offset, f"dump /{name} {out}\n", write=False)
        return out.read_bytes() if out.exists() else None


def write_head(disk: Path, head: bytes) -> None:
    """Step 4: the image's protective MBR and primary GPT; the disk is whole from here."""
    fd = _open_target(disk)
    try:
        diskio.pwrite_all(fd, head, 0)
        diskio.fsync(fd)
    except OSError as exc:
        raise InstallError(f"{disk}: writing the partition table failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def fit_gpt(disk: Path) -> list[str]:
    """Step 5: the backup GPT at the disk's real end, the protective MBR covering the whole disk."""
    fixed = gpt.repair(disk, move_backup=True)
    table = gpt.read_table(disk)
    want = gpt.protective_mbr(table.disk_lbas)[446:]
    fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        # The PMBR still covers the image's size only (sgdisk -v warns); its boot code and disk signature stay.
        if os.pread(fd, len(want), 446) != want:
            diskio.pwrite_all(fd, want, 446)
            diskio.fsync(fd)
            fixed.append("protective MBR now covers the whole disk")
    finally:
        os.close(fd)
    return fixed


def reread_partitions(disk: Path) -> str | None:
    """Ask the kernel to read the new table (as `blockdev --rereadpt`), so /dev/sdX1.. match the image;
    returns why it could not, for a note (a loop device without partition scanning says EINVAL)."""
    if not stat.S_ISBLK(os.stat(disk).st_mode):
        return None
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKRRPART)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
    return None
