"""The slot writer: pieces of every operation, resume boundaries, bounded buffers, and signed but unusual
manifests (several replace operations, empty ones, the largest chunk size) applied to real disk images."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from ue_helpers import CHUNK, World, signed_payload, slot_attrs, slot_bytes, veritysetup_verify

from bootloader import gpt, slots
from obelisk.signing import load_public_key
from update_engine import omaha, payload, slotwriter
from update_engine.apply import Applier, ApplyError
from update_engine.policy import Policy
from update_engine.slotwriter import Piece, Retry, SlotWriter, pieces_of, pool_size
from update_engine.transfer import FileStream, Transfer

MiB = 1 << 20


def _manifest(tmp: Path, world: World, data: bytes, cuts: list[int], chunk: int = CHUNK) -> payload.Manifest:
    p = signed_payload(world.priv, tmp / "m.payload", data, cuts=cuts, chunk_size=chunk)
    return payload.read_manifest(p, [load_public_key(world.pub)])


def test_pieces_cover_every_operation_in_order(world: World, tmp_path: Path) -> None:
    data = os.urandom(300_001)
    m = _manifest(tmp_path, world, data, [0, 100_000, 100_000, 250_000])
    plist = pieces_of(m)
    assert len(m.operations) == 5 and m.operations[0].data_length == 0
    pos = 0
    for p in plist:
        assert p.pos == pos and p.dst == pos and 0 < p.length <= CHUNK
        assert p.sha256 == hashlib.sha256(data[p.pos:p.pos + p.length]).hexdigest()
        pos += p.length
    assert pos == len(data) == m.data_size
    # Pieces restart at each operation: 100_000 = one full chunk + a short one.
    assert [p.length for p in plist[:2]] == [CHUNK, 100_000 - CHUNK]
    w = SlotWriter(-1, 0, len(data), m)
    assert w.resume_at(0) == 0 and w.resume_at(CHUNK + 5) == CHUNK and w.resume_at(100_000) == 100_000
    assert w.resume_at(100_001) == 100_000 and w.resume_at(10**9) == len(data)


def test_pool_is_bounded_by_bytes() -> None:
    assert pool_size(64 * 1024) == slotwriter.POOL_SIZE
    assert pool_size(4 * MiB) == slotwriter.POOL_SIZE
    assert pool_size(payload.MAX_CHUNK_SIZE) * payload.MAX_CHUNK_SIZE <= 32 * MiB


def test_writer_streams_into_a_file_and_reads_back(world: World, tmp_path: Path) -> None:
    """The writer alone, on a plain file standing in for the disk: bytes land at slot_off + dst, nowhere else."""
    data = os.urandom(200_000)
    src = signed_payload(world.priv, tmp_path / "p.payload", data, cuts=[70_000])
    m = payload.read_manifest(src, [load_public_key(world.pub)])
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xee" * (1 * MiB))
    fd = os.open(disk, os.O_RDWR)
    seen: list[int] = []
    try:
        w = SlotWriter(fd, 4096, 300_000, m, on_progress=lambda phase, done, total: seen.append(done))
        whole = hashlib.sha256(m.raw)
        w.write(FileStream(src, m.data_offset), 0, whole, Retry(open=lambda off: FileStream(src, off)))
    finally:
        os.close(fd)
    out = disk.read_bytes()
    assert out[4096:4096 + len(data)] == data
    assert out[:4096] == b"\xee" * 4096 and out[4096 + len(data):] == b"\xee" * (MiB - 4096 - len(data))
    assert whole.hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
    assert seen[-1] == len(data)


def test_refuses_a_write_outside_the_slot(world: World, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    src = signed_payload(world.priv, tmp_path / "p.payload", data)
    m = payload.read_manifest(src, [load_public_key(world.pub)])
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * MiB)
    fd = os.open(disk, os.O_RDWR)
    try:
        with pytest.raises(ApplyError, match="leave the passive slot"):
            SlotWriter(fd, 0, 50_000, m).write(FileStream(src, m.data_offset), 0, None,
                                               Retry(open=lambda off: FileStream(src, off)))
    finally:
        os.close(fd)
    assert disk.read_bytes()[CHUNK:] == b"\0" * (MiB - CHUNK)  # stopped at the first piece past the end


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cuts", [[0], [100_000], [0, 0, 200_000, 200_000], [4096, 8192, 12288]],
                         ids=["empty first op", "two replaces", "empty ops around", "many small ops"])
def test_signed_multi_operation_payload_applies(world: World, tmp_path: Path, cuts: list[int]) -> None:
    """Before: only the first operation was streamed (two replaces failed as 'corrupt'), and an empty first
    operation was an IndexError traceback."""
    new = world.build("1.1.0", seed=2)
    data = new.usr.read_bytes()
    src = signed_payload(world.priv, tmp_path / "multi.payload", data, cuts=cuts, root_hash=new.root_hash,
                         hash_offset=new.hash_offset)
    disk = world.disk(tmp_path / "disk.raw")
    a_before = hashlib.sha256(slot_bytes(disk, 3)).hexdigest()
    r = Applier(str(src), disk, [load_public_key(world.pub)], state_dir=tmp_path / "state",
                policy=Policy(expected_sha256=hashlib.sha256(src.read_bytes()).hexdigest())).run()
    assert r.slot == "B" and r.bytes_written == len(data)
    assert slot_bytes(disk, 4)[:len(data)] == data
    assert hashlib.sha256(slot_bytes(disk, 3)).hexdigest() == a_before
    assert slot_attrs(disk)["B"][1:] == (1, False)
    veritysetup_verify(disk, 4, new, tmp_path)


def test_resume_of_a_multi_operation_payload(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run cut short inside the second operation resumes at a piece boundary of that operation."""
    new = world.build("1.1.0", seed=2)
    data = new.usr.read_bytes()
    src = signed_payload(world.priv, tmp_path / "multi.payload", data, cuts=[100_000], root_hash=new.root_hash,
                         hash_offset=new.hash_offset)
    disk = world.disk(tmp_path / "disk.raw")
    state = tmp_path / "state"
    keys = [load_public_key(world.pub)]
    calls = [0]
    orig = slotwriter.pwrite_all

    class Boom(Exception):
        pass

    def dying(fd: int, view, offset: int) -> None:
        calls[0] += 1
        if calls[0] == 6:
            raise Boom()
        orig(fd, view, offset)

    monkeypatch.setattr(slotwriter, "pwrite_all", dying)
    with pytest.raises(Boom):
        Applier(str(src), disk, keys, state_dir=state, transfer=Transfer(checkpoint_bytes=1)).run()
    monkeypatch.setattr(slotwriter, "pwrite_all", orig)
    r = Applier(str(src), disk, keys, state_dir=state).run()
    assert r.resumed_from == 100_000 + 3 * CHUNK  # 2 pieces of op 0 and 3 of op 1 written, the 6th refused
    assert slot_bytes(disk, 4)[:len(data)] == data


def _big_disk(path: Path, slot_mib: int) -> Path:
    first = 2048
    n = slot_mib * MiB // 512
    gpt.create_table(path, (first + 2 * n + 2048) * 512, [
        gpt.PartitionSpec(3, "USR-A", slots.USR_TYPE, slots.USR_A_UUID, first, n, (1 << 48) | (1 << 56)),
        gpt.PartitionSpec(4, "USR-B", slots.USR_TYPE, slots.USR_B_UUID, first + n, n, 0),
    ], uuid.UUID(int=1))
    return path


RSS_CHILD = """
import sys
from pathlib import Path
from obelisk.signing import load_public_key
from update_engine.apply import Applier
Applier(sys.argv[1], Path(sys.argv[2]), [load_public_key(Path(sys.argv[3]))]).run()
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]))
"""


@pytest.mark.timeout(120)
def test_largest_chunk_size_applies_in_bounded_memory(world: World, tmp_path: Path) -> None:
    """chunk_size 2 GiB made an 18 MB apply take 14.7 GB; the format now stops at 16 MiB, and the pool of
    buffers is bounded in bytes, so the largest allowed chunk keeps the apply under 100 MiB."""
    data = os.urandom(18 * MiB)
    src = signed_payload(world.priv, tmp_path / "big.payload", data, chunk_size=payload.MAX_CHUNK_SIZE)
    disk = _big_disk(tmp_path / "disk.raw", 24)
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(src), str(disk), str(world.pub)], capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.strip().splitlines()[-1])
    print(f"peak RSS of an 18 MiB apply at chunk_size 16 MiB: {peak / 1024:.1f} MiB")
    assert peak < 100 * 1024
    assert slot_bytes(disk, 4)[:len(data)] == data


@pytest.mark.parametrize("chunk", [1 << 40, 2 << 30, 32 * MiB, 0, 1, 4095, 6000],
                         ids=["1 TiB", "2 GiB", "32 MiB", "0", "1", "4095", "not a block multiple"])
def test_unusable_chunk_sizes_refused_before_a_write(world: World, tmp_path: Path, chunk: int) -> None:
    data = os.urandom(50_000)
    src = signed_payload(world.priv, tmp_path / "odd.payload", data, chunk_size=max(chunk, 1))
    if chunk == 0:  # the helper cannot cut by 0: sign a manifest that says 0
        src = signed_payload(world.priv, tmp_path / "odd.payload", data,
                             manifest_edit=lambda obj: obj.update(chunk_size=0))
    disk = world.disk(tmp_path / "disk.raw")
    before = slot_attrs(disk)
    with pytest.raises(ApplyError) as ei:
        Applier(str(src), disk, [load_public_key(world.pub)]).run()
    assert "chunk_size" in str(ei.value) and "16777216" in str(ei.value), str(ei.value)
    assert ei.value.code == omaha.ERR_PAYLOAD_VERIFICATION
    assert slot_attrs(disk) == before


def test_piece_is_a_plain_record() -> None:
    assert Piece(0, 1, 2, "x") == Piece(0, 1, 2, "x")
