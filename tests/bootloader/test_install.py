"""`obelisk install`: a real tiny release (images/tiny.toml, built once per module with a test key)
written onto real loop devices (losetup) and regular files, judged by sgdisk -v, our GPT reader,
debugfs and `obelisk boot status`.

Loop devices work here (losetup -f --show); partition scanning of loop devices does not (no
/dev/loopNpM nodes appear in this container), so "a mounted disk" is a loop device whose whole
device carries a mounted ext4. A loop test is skipped, saying why, where losetup fails. The
inspection parsers (mountinfo, swaps, sysfs holders) are also run on text and on a sysfs-shaped
folder, so their logic is tested without devices. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from testlib import OBELISK, REPO, need_tools

from bootloader import gpt, install_disk
from bootloader.install import OEM_LABEL, ext4_label, read_oem_file
from builder.install import OEM_CONFIG

TINY = REPO / "images" / "tiny.toml"
CLOUD_CONFIG = b"#cloud-config\nhostname: installed-host\n"
BUTANE = (b"variant: flatcar\nversion: 1.0.0\nstorage:\n  files:\n    - path: /etc/motd\n      contents:\n"
          b"        inline: hi\n")
MIB = 1024 * 1024


@dataclass
class Rel:
    path: Path  # <out>/tiny/<version>
    pub: Path
    size: int  # of disk.raw


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory) -> Rel:
    need_tools("mksquashfs", "veritysetup", "mcopy", "grub-mkimage", "debugfs", "sgdisk")
    out = tmp_path_factory.mktemp("install-rel")
    cache = Path(os.environ.get("OBELISK_TEST_CACHE") or out / "cache")
    subprocess.run([OBELISK, "key", "generate", str(out / "key")], check=True, capture_output=True)
    res = subprocess.run([OBELISK, "image", "build", str(TINY), "--out", str(out / "rel"), "--cache", str(cache),
                          "--key", str(out / "key" / "obelisk.key")], cwd=REPO, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    path = next((out / "rel").glob("*/*/release.json")).parent
    return Rel(path, out / "key" / "obelisk.pub", (path / "disk.raw").stat().st_size)


def install(rel: Rel, disk: Path | str, *args: str, source: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OBELISK, "install", source or str(rel.path), "--disk", str(disk), "--key", str(rel.pub),
                           *args], capture_output=True, text=True, timeout=300)


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line a refusal prints (and nothing else on stderr but override warnings)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def patterned(path: Path, size: int) -> Path:
    """A target that is not blank (so "untouched" means something): a pattern at its start and end."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"OLD-DISK" * (MIB // 8))
        f.seek(size - MIB)
        f.write(b"OLD-TAIL" * (MIB // 8))
    return path


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    res = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"loop devices do not work here ({res.stderr.strip()}): covered by the regular-file tests")
    dev = Path(res.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], capture_output=True, timeout=30)


def oem_offset(disk: Path) -> int:
    table = gpt.read_table(disk)
    oem = next(p for p in table.partitions if p.name == OEM_LABEL)
    return oem.first_lba * table.sector_size


def check_installed(disk: Path, rel: Rel, config: bytes | None) -> None:
    v = subprocess.run(["sgdisk", "-v", str(disk)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and "No problems found" in v.stdout, v.stdout + v.stderr
    table = gpt.read_table(disk)
    assert not table.problems
    assert table.backup_lba == table.disk_lbas - 1  # the backup sits at the real end, not the image's
    assert table.disk_lbas * table.sector_size > rel.size
    if config is not None:
        assert read_oem_file(disk, oem_offset(disk), OEM_CONFIG) == config
    st = subprocess.run([OBELISK, "boot", "status", "--disk", str(disk), "--json"], capture_output=True, text=True,
                        timeout=60)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["next"] == 3  # a fresh install boots USR-A
    assert "warning" not in st.stderr


# ---------------------------------------------------------------- onto loop devices


@pytest.mark.timeout(900)
def test_install_onto_a_loop_device_bigger_than_the_image(rel: Rel, tmp_path: Path) -> None:
    backing = patterned(tmp_path / "disk", rel.size + 128 * MIB)
    (tmp_path / "cc.yml").write_bytes(CLOUD_CONFIG)
    with loop_device(backing) as dev:
        proc = install(rel, dev, "--config", str(tmp_path / "cc.yml"))
        assert proc.returncode == 0, proc.stderr
        assert "backup GPT moved" in proc.stdout and "installed tiny" in proc.stdout
        check_installed(dev, rel, CLOUD_CONFIG)
        # root-owned, 0600: a config carries secrets
        stat = subprocess.run(["debugfs", "-R", f"stat /{OEM_CONFIG}", f"{dev}?offset={oem_offset(dev)}"],
                              capture_output=True, text=True, timeout=60).stdout
        assert "Mode:  0600" in stat and "User:     0" in stat
        # the USR-A partition holds exactly the image's USR-A
        table = gpt.read_table(dev)
        usr = table.partition(3)
        assert usr is not None
        with open(dev, "rb") as d, open(rel.path / "disk.raw", "rb") as img:
            for f in (d, img):
                f.seek(usr.first_lba * 512)
            assert d.read(4 * MIB) == img.read(4 * MIB)


@pytest.mark.timeout(900)
def test_dry_run_writes_nothing(rel: Rel, tmp_path: Path) -> None:
    backing = patterned(tmp_path / "disk", rel.size + 64 * MIB)
    before = sha(backing)
    (tmp_path / "cc.yml").write_bytes(CLOUD_CONFIG)
    with loop_device(backing) as dev:
        proc = install(rel, dev, "--config", str(tmp_path / "cc.yml"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would write" in proc.stdout and "would move the backup GPT" in proc.stdout
    assert f"as /{OEM_CONFIG}" in proc.stdout and "nothing was written" in proc.stdout
    assert sha(backing) == before


@pytest.mark.timeout(900)
def test_refused_onto_a_mounted_loop_device(rel: Rel, tmp_path: Path) -> None:
    backing = tmp_path / "disk"
    with open(backing, "wb") as f:
        f.truncate(rel.size + 64 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, timeout=120)
    before = sha(backing)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(backing) as dev:
        # read-only, journal not replayed: the mount itself writes nothing, so "untouched" can be checked
        m = subprocess.run(["mount", "-o", "ro,noload", str(dev), str(mnt)], capture_output=True, text=True, timeout=60)
        if m.returncode != 0:
            pytest.skip(f"cannot mount here: {m.stderr.strip()}")
        try:
            proc = install(rel, dev)
            assert proc.returncode == 2
            line = one_error(proc)
            assert f"is in use: mounted on {mnt}" in line and "nothing was written" in line and "--force" in line
            target = install_disk.inspect(dev)
            assert target.in_use == [f"mounted on {mnt}"]
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
    assert sha(backing) == before


@pytest.mark.timeout(900)
def test_refused_while_another_program_holds_the_device(rel: Rel, tmp_path: Path) -> None:
    """An exclusive open (what mkfs, a partitioner or another install holds) is caught by O_EXCL."""
    backing = patterned(tmp_path / "disk", rel.size + 64 * MIB)
    with loop_device(backing) as dev:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
        try:
            proc = install(rel, dev)
        finally:
            os.close(fd)
    assert proc.returncode == 2
    assert "is in use: busy" in one_error(proc)


@pytest.mark.timeout(900)
def test_refused_onto_a_too_small_loop_device_even_with_force(rel: Rel, tmp_path: Path) -> None:
    backing = patterned(tmp_path / "disk", rel.size - 16 * MIB)
    before = sha(backing)
    with loop_device(backing) as dev:
        plain = install(rel, dev)
        forced = install(rel, dev, "--force")
    for proc in (plain, forced):
        assert proc.returncode == 2
        line = one_error(proc)
        assert "is too small" in line and f"{rel.size:,}" in line
    assert "--force" not in one_error(forced)  # nothing to force: the image cannot fit
    assert sha(backing) == before


# ---------------------------------------------------------------- onto regular files


@pytest.mark.timeout(900)
def test_regular_file_refused_without_force_then_installed_with_it(rel: Rel, tmp_path: Path) -> None:
    disk = patterned(tmp_path / "disk.img", rel.size + 64 * MIB)
    before = sha(disk)
    proc = install(rel, disk)
    assert proc.returncode == 2
    assert "is a regular file, not a block device" in one_error(proc)
    assert sha(disk) == before
    (tmp_path / "config.bu").write_bytes(BUTANE)
    proc = install(rel, disk, "--force", "--config", str(tmp_path / "config.bu"))
    assert proc.returncode == 0, proc.stderr
    assert "warning: override (--force):" in proc.stderr and "regular file" in proc.stderr
    ign = json.loads(read_oem_file(disk, oem_offset(disk), OEM_CONFIG) or b"")
    assert ign["ignition"]["version"].startswith("3.")  # Butane went in as the Ignition JSON the host reads
    assert ign["storage"]["files"][0]["path"] == "/etc/motd"
    check_installed(disk, rel, None)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", ["missing", "bad-signature", "truncated", "bad-config", "no-key", "not-a-disk"])
def test_bad_input_is_one_line_and_leaves_the_disk_untouched(rel: Rel, tmp_path: Path, case: str) -> None:
    disk = patterned(tmp_path / "disk.img", rel.size + 64 * MIB)
    before = sha(disk)
    src, extra = str(rel.path), ["--force"]
    if case == "missing":
        src = str(tmp_path / "no-such-release")
    elif case in ("bad-signature", "truncated"):
        copy = tmp_path / "copy"
        shutil.copytree(rel.path, copy)
        if case == "bad-signature":
            sig = bytearray((copy / "SHA256SUMS.sig").read_bytes())
            sig[len(sig) // 2] ^= 0xFF
            (copy / "SHA256SUMS.sig").write_bytes(bytes(sig))
        else:
            os.truncate(copy / "disk.raw", rel.size // 2)
        src = str(copy)
    elif case == "bad-config":
        (tmp_path / "cc.yml").write_text("#cloud-config\nusers: 42\n")
        extra += ["--config", str(tmp_path / "cc.yml")]
    elif case == "no-key":
        extra += ["--key", str(tmp_path / "no.pub")]
    target = disk
    if case == "not-a-disk":
        target = tmp_path / "fifo"
        os.mkfifo(target)  # opening a FIFO would block: it must be refused from its stat alone
    proc = subprocess.run([OBELISK, "install", src, "--disk", str(target), "--key", str(rel.pub), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    line = one_error(proc)
    expect = {"missing": "no such release folder", "bad-signature": "SHA256SUMS.sig", "truncated": "disk.raw",
              "bad-config": "invalid config", "no-key": "no public key", "not-a-disk": "neither a block device"}
    assert expect[case] in line, line
    assert sha(disk) == before


# ---------------------------------------------------------------- from an http(s) URL


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the installer hung up on purpose
            super().copyfile(source, outputfile)


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    handler = lambda *a, **kw: _Quiet(*a, directory=str(folder), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.timeout(900)
def test_install_from_a_url(rel: Rel, tmp_path: Path) -> None:
    disk = patterned(tmp_path / "disk.img", rel.size + 64 * MIB)
    (tmp_path / "cc.yml").write_bytes(CLOUD_CONFIG)
    with serve(rel.path.parent.parent) as base:
        url = f"{base}/{rel.path.parent.name}/{rel.path.name}/"
        proc = install(rel, disk, "--force", "--config", str(tmp_path / "cc.yml"), source=url)
    assert proc.returncode == 0, proc.stderr
    check_installed(disk, rel, CLOUD_CONFIG)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", ["bad-signature", "truncated", "not-a-release"])
def test_bad_url_is_refused_before_a_byte_is_written(rel: Rel, tmp_path: Path, case: str) -> None:
    disk = patterned(tmp_path / "disk.img", rel.size + 64 * MIB)
    before = sha(disk)
    served = tmp_path / "served"
    served.mkdir()
    for f in rel.path.iterdir():
        if not (case == "truncated" and f.name == "disk.raw"):
            os.link(f, served / f.name)
    if case == "bad-signature":
        (served / "SHA256SUMS.sig").unlink()
        sig = bytearray((rel.path / "SHA256SUMS.sig").read_bytes())
        sig[-1] ^= 0x01
        (served / "SHA256SUMS.sig").write_bytes(bytes(sig))
    elif case == "truncated":
        with open(rel.path / "disk.raw", "rb") as src, open(served / "disk.raw", "wb") as dst:
            dst.write(src.read(rel.size - MIB))
    elif case == "not-a-release":
        (served / "SHA256SUMS").unlink()
    with serve(served) as base:
        proc = install(rel, disk, "--force", source=base)
    assert proc.returncode != 0
    line = one_error(proc)
    expect = {"bad-signature": "SHA256SUMS.sig", "truncated": "truncated or replaced", "not-a-release": "HTTP 404"}
    assert expect[case] in line and "nothing was written" in line, line
    assert sha(disk) == before


# ---------------------------------------------------------------- inspection logic, without devices


def test_inspect_reads_a_disk_and_writes_nothing(rel: Rel, tmp_path: Path) -> None:
    """libparted asks whether to "fix" a GPT whose backup is not at the end: we answer ignore."""
    disk = tmp_path / "grown.img"
    shutil.copyfile(rel.path / "disk.raw", disk)
    os.truncate(disk, rel.size + 32 * MIB)
    before = sha(disk)
    t = install_disk.inspect(disk)
    assert sha(disk) == before
    assert (t.kind, t.size, t.sector_size, t.label, t.in_use) == ("file", rel.size + 32 * MIB, 512, "gpt", [])
    assert [(p.number, p.name) for p in t.partitions] == [(1, "EFI-SYSTEM"), (3, "USR-A"), (4, "USR-B"),
                                                          (6, "OEM"), (9, "ROOT")]
    assert next(p for p in t.partitions if p.number == 6).fs == "ext4"
    assert ext4_label(disk, oem_offset(disk)) == "OEM"
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(8 * MIB)
    assert install_disk.inspect(blank).label == "" and install_disk.inspect(blank).partitions == []


def test_mounts_and_swaps_are_matched_by_device_number() -> None:
    info = ("22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n"
            "30 22 7:1 / /mnt/my\\040disk rw shared:2 - ext4 /dev/loop1 rw\n"
            "31 22 0:5 / /dev rw shared:3 - devtmpfs udev rw\n")
    assert install_disk.mounts_on(info, {"7:0", "7:1"}) == ["/mnt/my disk"]
    assert install_disk.mounts_on(info, {"8:0"}) == []
    swaps = "Filename\tType\tSize\tUsed\tPriority\n/dev/sdb2   partition\t1000\t0\t-2\n/swapfile file 10 0 -3\n"
    numbers = {"/dev/sdb2": "8:18", "/swapfile": ""}
    assert install_disk.swaps_on(swaps, {"8:16", "8:18"}, numbers.get) == ["/dev/sdb2"]
    assert install_disk.swaps_on(swaps, {"8:0"}, numbers.get) == []


def test_holders_of_the_disk_and_its_partitions_come_from_sysfs(tmp_path: Path) -> None:
    """A folder shaped like /sys/block (real files, the layout the kernel uses)."""
    disk = tmp_path / "sdz"
    (disk / "holders").mkdir(parents=True)
    (disk / "dev").write_text("8:240\n")
    part = disk / "sdz1"
    (part / "holders" / "dm-0").mkdir(parents=True)
    (part / "partition").write_text("1\n")
    (part / "dev").write_text("8:241\n")
    devices, holders = install_disk.block_tree("sdz", tmp_path)
    assert devices == {"8:240", "8:241"}
    assert holders == ["sdz1 is held by dm-0"]


def test_refusals_and_which_ones_force_overrides() -> None:
    t = install_disk.Target(Path("/dev/sdz"), "block", 100 * MIB, 4096, in_use=["mounted on /srv"])
    got = {r.reason: r.forceable for r in install_disk.refusals(t, 200 * MIB)}
    assert got == {"/dev/sdz is in use: mounted on /srv": True,
                   f"/dev/sdz is too small: {100 * MIB:,} bytes, the image needs {200 * MIB:,}": False,
                   "/dev/sdz has 4096-byte sectors, the image's GPT was made for 512-byte sectors (firmware would "
                   "not find it)": True}
    f = install_disk.Target(Path("x.img"), "file", 100 * MIB, 512)
    assert [(r.forceable, "regular file" in r.reason or "too small" in r.reason)
            for r in install_disk.refusals(f, 200 * MIB)] == [(True, True), (True, True)]
    ok = install_disk.Target(Path("/dev/sdz"), "block", 300 * MIB, 512)
    assert install_disk.refusals(ok, 200 * MIB) == []
