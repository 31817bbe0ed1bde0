"""The grubenv on the ESP and its reconciliation with the GPT (bootloader.loader, esp, grub).

Real parts: mkfs.fat/mcopy make the ESP, mtools/fsck.fat read it back, bootloader.gpt and
bootloader.slots write the GPT. Crash safety is tested by killing a process mid-update.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testlib import OBELISK, need_tools
from vmdisk import make_disk

from bootloader import esp, gpt, grub, loader, slots
from obelisk.tools import run

MIB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_disk(tmp_path / "disk.raw")


def attrs(disk: Path) -> dict[str, tuple[int, int, int]]:
    return {s.name: (s.priority, s.tries, int(s.successful)) for s in slots.read_slots(disk)}


def raw_attrs(disk: Path) -> dict[str, tuple[int, int, int]]:
    """GPT attributes without reconcile (what is on disk right now)."""
    t = gpt.read_table(disk)
    return {"A" if p.index == 3 else "B": loader._decode(p.attributes) for p in t.partitions if p.index in (3, 4)}


def env_of(disk: Path) -> grub.LoaderEnv:
    env = loader.read_env(disk)
    assert env is not None
    return env


def grub_writes(disk: Path, **changes: str) -> None:
    """Change env variables the way GRUB's save_env / the guest's sed do: in place, same 1024 bytes."""
    vars_ = grub.parse_env(esp.read_file(disk, grub.ENV_PATH))
    vars_.update(changes)
    esp.rewrite_file(disk, grub.ENV_PATH, grub.render_env(vars_))


def test_env_roundtrip_and_limits() -> None:
    env = esp.initial_env(esp.SlotBoot("ab" * 32, 4096, "1.0.0"), esp.SlotBoot("cd" * 32, 8192, "1.0.1"))
    block = grub.render_env(env.to_vars())
    assert len(block) == 1024 and block.startswith(b"# GRUB Environment Block\n")
    # The slot attributes sit in the first 512-byte sector (atomic in-place rewrite).
    assert b"B_base=" in block[:512]
    back = grub.LoaderEnv.from_vars(grub.parse_env(block))
    assert back == env
    with pytest.raises(grub.GrubEnvError, match="do not fit"):
        grub.render_env({"x": "y" * 1100})
    with pytest.raises(grub.GrubEnvError, match="signature"):
        grub.parse_env(b"x" * 1024)
    with pytest.raises(grub.GrubEnvError, match="1024"):
        grub.parse_env(b"# GRUB Environment Block\n")
    bad = dict(env.to_vars(), A_tries="16")
    with pytest.raises(grub.GrubEnvError, match="A_tries"):
        grub.LoaderEnv.from_vars(bad)
    with pytest.raises(grub.GrubEnvError, match="newline"):
        grub.render_env({"A_version": "1\n2"})


def test_grub_editenv_reads_our_block(tmp_path: Path) -> None:
    """GRUB's own tool parses the block we render."""
    need_tools("grub-editenv")
    f = tmp_path / "grubenv"
    f.write_bytes(grub.render_env(esp.initial_env(esp.SlotBoot("ab" * 32, 4096, "1.0.0")).to_vars()))
    out = run(["grub-editenv", f, "list"]).stdout
    assert "A_prio=1" in out and "A_base=1,0,1" in out and "A_hashoff=4096" in out


@pytest.mark.parametrize("fat", [12, 16, 32])
def test_esp_read_and_rewrite_in_place(tmp_path: Path, fat: int) -> None:
    need_tools("mcopy", "fsck.fat")
    disk = make_disk(tmp_path / "disk.raw", fat=fat)
    block = esp.read_file(disk, grub.ENV_PATH)
    assert block.startswith(b"# GRUB Environment Block")
    new = grub.render_env({"A_prio": "7"})
    esp.rewrite_file(disk, grub.ENV_PATH, new)
    off = esp.esp_offset(disk)
    assert run(["mtype", "-i", f"{disk}@@{off}", "::/EFI/obelisk/grubenv"]).stdout.encode() == new
    with pytest.raises(esp.EspError, match="another size"):
        esp.rewrite_file(disk, grub.ENV_PATH, b"short")
    with pytest.raises(esp.EspError, match="no /EFI/nothing"):
        esp.read_file(disk, "EFI/nothing/x")
    # fsck.fat on the ESP alone: the in-place rewrite left the filesystem clean.
    espimg = tmp_path / "esp.img"
    size = gpt.read_table(disk).partition(1).size_lba * 512
    with open(disk, "rb") as d, open(espimg, "wb") as e:
        d.seek(off)
        e.write(d.read(size))
    run(["fsck.fat", "-n", espimg])


def test_copy_in_creates_files(disk: Path) -> None:
    esp.copy_in(disk, "EFI/obelisk/extra/note.txt", b"hello")
    assert esp.read_file(disk, "EFI/obelisk/extra/note.txt") == b"hello"
    assert loader.read_env(disk) is not None  # the grubenv is untouched


def test_disk_without_loader_is_a_noop(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "plain.raw", populate=False)
    before = disk.read_bytes()
    loader.reconcile(disk)
    loader.mirror(disk)
    loader.stage(disk, 4, root_hash="ab" * 32, hash_offset=4096, version="2")
    assert disk.read_bytes() == before


def test_mirror_follows_every_gpt_write(disk: Path) -> None:
    slots.stage_trial(disk, slots.USR_B, tries=2)
    env = env_of(disk)
    g = raw_attrs(disk)
    for n in ("A", "B"):
        assert env.slots[n].working == g[n] == env.slots[n].base
    assert g["B"][1:] == (2, 0) and g["B"][0] > g["A"][0]


def test_reconcile_takes_burned_try_and_guest_mark_good(disk: Path) -> None:
    slots.stage_trial(disk, slots.USR_B)
    assert attrs(disk)["B"][1:] == (1, 0)
    grub_writes(disk, B_tries="0")  # GRUB burned the trial's try
    assert raw_attrs(disk)["B"][1] == 1  # not in the GPT yet ...
    assert attrs(disk)["B"][1:] == (0, 0)  # ... reconcile (via slots) takes it in
    assert raw_attrs(disk)["B"][1:] == (0, 0)
    grub_writes(disk, B_ok="1", B_tries="0")  # the guest's boot check marked it good (no Python there)
    st = attrs(disk)
    assert st["B"][1:] == (0, 1)
    assert slots.next_index(slots.read_slots(disk)) == slots.USR_B
    env = env_of(disk)
    assert env.slots["B"].base == env.slots["B"].working == raw_attrs(disk)["B"]


def test_stale_env_loses_to_gpt(disk: Path) -> None:
    """Crash between the GPT write and the env write: the GPT (obelisk's last word) wins."""
    table = gpt.read_table(disk)
    b = table.partition(4)
    gpt.write_table(disk, gpt.with_attributes(table, {4: loader._encode(b.attributes, 2, 1, 0)}))
    # The env still says B is P0 (base 0,0,0): GRUB would boot A, which is safe; now reconcile.
    assert env_of(disk).slots["B"].working == (0, 0, 0)
    assert attrs(disk)["B"] == (2, 1, 0)
    assert env_of(disk).slots["B"].working == (2, 1, 0)


def test_stage_records_boot_data(disk: Path) -> None:
    slots.mark_unbootable(disk, 4)
    loader.stage(disk, 4, root_hash="CD" * 32, hash_offset=65536, version="1.0.1")
    env = env_of(disk)
    assert (env.slots["B"].hash, env.slots["B"].hashoff, env.slots["B"].version) == ("cd" * 32, 65536, "1.0.1")
    assert env.slots["A"].hash == "ab" * 32
    with pytest.raises(loader.LoaderError, match="not hex"):
        loader.stage(disk, 4, root_hash="zz", hash_offset=1, version="x")
    with pytest.raises(loader.LoaderError, match="not a USR slot"):
        loader.stage(disk, 9, root_hash="ab", hash_offset=1, version="x")


def test_corrupt_env_is_a_clear_error(disk: Path) -> None:
    grub_writes(disk, A_tries="x")
    with pytest.raises(gpt.GptError, match="A_tries.*restore the ESP"):
        slots.read_slots(disk)
    res = subprocess.run([OBELISK, "boot", "status", "--disk", str(disk)],
                         capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


WORKER = """
import sys, random
from pathlib import Path
from bootloader import slots
disk = Path(sys.argv[1]); rnd = random.Random(int(sys.argv[2]))
print("ready", flush=True)
while True:
    op = rnd.choice(["trial", "good", "unbootable", "prio"])
    i = rnd.choice([3, 4])
    if op == "trial": slots.stage_trial(disk, i, tries=rnd.randint(1, 3))
    elif op == "good": slots.mark_good(disk, i)
    elif op == "unbootable": slots.mark_unbootable(disk, i)
    else: slots.prioritize(disk, i)
"""


def test_killed_mid_update_env_and_gpt_agree_after_reconcile(disk: Path, tmp_path: Path) -> None:
    """SIGKILL a process doing slot operations at random moments; after reconcile the env mirrors the GPT."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    rnd = random.Random(5)
    repo = Path(__file__).resolve().parents[2]
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(disk), str(round_)], stdout=subprocess.PIPE,
                                cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rnd.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        loader.reconcile(disk)
        env = env_of(disk)
        g = raw_attrs(disk)
        for n in ("A", "B"):
            assert env.slots[n].working == env.slots[n].base == g[n], (round_, n, env.slots[n], g[n])
