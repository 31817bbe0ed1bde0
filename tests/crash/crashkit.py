"""Crash states, enumerated: record what an operation writes, build every state a power cut could
leave, and judge each with the real tools.

Recording: ``obelisk.diskio.recording`` sees every positioned write and flush that the GPT code,
the in-place grubenv rewrite and the slot writer issue against one disk. From that record
``crash_states`` builds, in the style of CrashMonkey/ALICE:
- every prefix of the writes (the cut came between two writes, nothing reordered);
- for the epoch in flight (the writes after the last completed flush), every subset of its writes
  (the kernel and the disk may reorder or drop writes that no flush ordered);
- torn writes: a write cut at each sector boundary inside it (new sectors first, the rest old), and
  inside each sector it changes (first half new and second half old, and the other way round),
  the model of a disk without sector atomicity.
States that leave the same bytes are judged once.

Judging (``judge``), per state, with the real parts: the GPT must be readable (one good copy is
enough, as for cgpt and GRUB's part_gpt); GRUB's own choice comes from ``grub-emu`` running the
image's selection code (``grub.render_select``, which is the text grub.cfg contains) over the
state's grubenv; the slot GRUB picks, and every other slot GRUB's selection could ever pick, must
verify with ``veritysetup verify`` against the root hash and hash offset that the grubenv gives for
it (kernel, initramfs and /usr live in the slot, so a matching root hash means they belong
together); GRUB's choice must be the one before the operation or the one after it (the operation
is atomic to the boot loader); then the boot-time reconcile runs (``obelisk boot status``'s read,
in-process through the CLI) and GRUB's next choice must equal ``slots.next_index`` on the
reconciled GPT. The first boot after a cut may still follow the old grubenv while the GPT already
holds the new state (the write order is GPT, then grubenv); those states are counted and shown.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from typer.testing import CliRunner

from bootloader import esp, gpt, grub, loader, slots
from bootloader.layout import USR_A, USR_B, USR_TYPE, encode_bits
from obelisk import diskio
from obelisk.tools import run

SECTOR = 512
EMU_MODULES = Path("/usr/lib/grub/x86_64-emu")
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
ESP_FIRST, ESP_MIB = 2048, 8
SLOT_MIB = 4
A_FIRST = ESP_FIRST + ESP_MIB * 2048
B_FIRST = A_FIRST + SLOT_MIB * 2048
DISK_BYTES = (B_FIRST + SLOT_MIB * 2048 + 2048) * SECTOR
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_SUBSET = 8  # an epoch with more writes than this gets its subsets sampled, not all 2^n


# ---------------------------------------------------------------- the disk


@dataclass(frozen=True)
class Usr:
    version: str
    image: bytes
    root_hash: str
    hash_offset: int


def make_usr(work: Path, version: str, seed: int) -> Usr:
    """A small USR image: squashfs of incompressible bytes plus its dm-verity tree at hash_offset."""
    tree = work / f"tree-{version}"
    (tree / "lib/obelisk/boot").mkdir(parents=True)
    (tree / "lib/obelisk/boot/vmlinuz").write_bytes(random.Random(seed).randbytes(256 * 1024))
    (tree / "lib/obelisk/boot/initrd.img").write_bytes(random.Random(seed + 7).randbytes(64 * 1024))
    img = work / f"usr-{version}.img"
    run(["mksquashfs", tree, img, "-comp", "gzip", "-noappend", "-all-root", "-no-progress", "-quiet",
         "-mkfs-time", "0", "-all-time", "0"])
    hash_offset = -(-img.stat().st_size // 4096) * 4096
    with open(img, "r+b") as f:
        f.truncate(hash_offset)
    res = run(["veritysetup", "format", img, img, f"--hash-offset={hash_offset}",
               f"--data-blocks={hash_offset // 4096}", "--salt=" + "00" * 32, "--uuid=" + str(uuid.UUID(int=seed + 1))])
    root = next(ln.split(":", 1)[1].strip() for ln in res.stdout.splitlines() if ln.startswith("Root hash"))
    return Usr(version, img.read_bytes(), root, hash_offset)


def attrs(p: int, t: int, s: int) -> int:
    return encode_bits(0, p, t, s)


def make_disk(work: Path, a: Usr, b: Usr | None) -> Path:
    """GPT (ESP 1, USR-A 3, USR-B 4), a FAT ESP with grub.cfg and the first grubenv, USR-A good."""
    disk = work / "disk.raw"
    gpt.create_table(disk, DISK_BYTES, [
        gpt.PartitionSpec(1, "EFI-SYSTEM", ESP_TYPE, uuid.UUID(int=11), ESP_FIRST, ESP_MIB * 2048, 0),
        gpt.PartitionSpec(USR_A, "USR-A", USR_TYPE, slots.USR_A_UUID, A_FIRST, SLOT_MIB * 2048, attrs(1, 0, 1)),
        gpt.PartitionSpec(USR_B, "USR-B", USR_TYPE, slots.USR_B_UUID, B_FIRST, SLOT_MIB * 2048, attrs(0, 0, 0)),
    ], uuid.UUID(int=10))
    fat = work / "esp.img"
    fat.unlink(missing_ok=True)
    run(["mkfs.fat", "-F", "16", "-s", "1", "-n", "EFI-SYSTEM", "-C", fat, str(ESP_MIB * 1024)])
    files = work / "espfiles"
    (files / "EFI/obelisk").mkdir(parents=True, exist_ok=True)
    (files / grub.CFG_PATH).write_text(grub.render_cfg())
    usr_b = esp.SlotBoot(b.root_hash, b.hash_offset, b.version) if b else None
    env = esp.initial_env(esp.SlotBoot(a.root_hash, a.hash_offset, a.version), usr_b)
    (files / grub.ENV_PATH).write_bytes(grub.render_env(env.to_vars()))
    run(["mcopy", "-s", "-m", "-i", fat, files / "EFI", "::/"])
    with open(disk, "r+b") as f:
        f.seek(ESP_FIRST * SECTOR)
        f.write(fat.read_bytes())
        f.seek(A_FIRST * SECTOR)
        f.write(a.image)
    return disk


def write_slot(disk: Path, index: int, usr: Usr) -> None:
    with open(disk, "r+b") as f:
        f.seek((A_FIRST if index == USR_A else B_FIRST) * SECTOR)
        f.write(usr.image)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- recording and states


@dataclass
class Recorded:
    """One operation's record: the disk before it (a copy), its writes and flushes, the disk after."""

    name: str
    before: Path
    after: Path
    ops: list[diskio.Write | diskio.Flush]


def record(name: str, disk: Path, work: Path, op: Callable[[Path], object]) -> Recorded:
    before = work / f"{name}.before"
    shutil.copyfile(disk, before)
    with diskio.recording(disk) as rec:
        op(disk)
    after = work / f"{name}.after"
    shutil.copyfile(disk, after)
    return Recorded(name, before, after, list(rec.ops))


@dataclass(frozen=True)
class State:
    op: str
    kind: str  # prefix / reorder / torn-sector / torn-inside
    writes: tuple[tuple[int, bytes], ...]  # applied in order over the "before" disk

    def key(self, base: Callable[[int, int], bytes]) -> str:
        """Digest of the bytes this state changes (after applying its writes to the before-image)."""
        image: dict[int, bytes] = {}
        for off, data in self.writes:
            for i in range(0, len(data), SECTOR):
                image[off + i] = data[i:i + SECTOR]
        h = hashlib.sha256()
        for off in sorted(image):
            if image[off] != base(off, len(image[off])):
                h.update(off.to_bytes(8, "little") + image[off])
        return h.hexdigest()


def _epochs(ops: list[diskio.Write | diskio.Flush]) -> list[list[diskio.Write]]:
    out: list[list[diskio.Write]] = [[]]
    for o in ops:
        if isinstance(o, diskio.Flush):
            out.append([])
        else:
            out[-1].append(o)
    return [e for e in out if e]


def _torn(w: diskio.Write, old: bytes) -> Iterator[tuple[str, diskio.Write]]:
    """Torn versions of one write: cut at each sector boundary where bytes change, and half-sector tears."""
    n = len(w.data) // SECTOR
    changed = [i for i in range(n) if w.data[i * SECTOR:(i + 1) * SECTOR] != old[i * SECTOR:(i + 1) * SECTOR]]
    for i in changed:
        if i > 0:  # sectors before i new, i and after old
            yield "torn-sector", diskio.Write(w.offset, w.data[:i * SECTOR] + old[i * SECTOR:])
        if i + 1 < n:  # up to and including i new, the rest old
            yield "torn-sector", diskio.Write(w.offset, w.data[:(i + 1) * SECTOR] + old[(i + 1) * SECTOR:])
        lo, mid, hi = i * SECTOR, i * SECTOR + SECTOR // 2, (i + 1) * SECTOR
        yield "torn-inside", diskio.Write(w.offset, w.data[:mid] + old[mid:])
        yield "torn-inside", diskio.Write(w.offset, w.data[:lo] + old[lo:mid] + w.data[mid:hi] + old[hi:])


def _overlay(old: Callable[[int, int], bytes], writes: list[diskio.Write], off: int, n: int) -> bytes:
    """The bytes at [off, off+n) once ``writes`` are on the disk: what a torn write tears against."""
    buf = bytearray(old(off, n))
    for w in writes:
        lo, hi = max(off, w.offset), min(off + n, w.offset + len(w.data))
        if lo < hi:
            buf[lo - off:hi - off] = w.data[lo - w.offset:hi - w.offset]
    return bytes(buf)


def crash_states(r: Recorded, seed: int = 0) -> list[State]:
    """Every distinct state a cut during ``r`` can leave (see the module docstring)."""
    with open(r.before, "rb") as f:
        def old(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n).ljust(n, b"\0")

        states: list[State] = []
        writes = [o for o in r.ops if isinstance(o, diskio.Write)]
        for k in range(len(writes) + 1):
            states.append(State(r.name, "prefix", tuple((w.offset, w.data) for w in writes[:k])))
        done: list[diskio.Write] = []
        rng = random.Random(seed)
        for epoch in _epochs(r.ops):
            if len(epoch) <= MAX_SUBSET:
                subsets = [c for k in range(len(epoch) + 1) for c in itertools.combinations(range(len(epoch)), k)]
            else:
                subsets = [tuple(sorted(rng.sample(range(len(epoch)), rng.randint(0, len(epoch)))))
                           for _ in range(2 ** MAX_SUBSET)]
            for sub in subsets:
                chosen = done + [epoch[i] for i in sub]
                states.append(State(r.name, "reorder", tuple((w.offset, w.data) for w in chosen)))
            for j, w in enumerate(epoch):
                # the other writes of the epoch: none, or all those issued before it
                for pre in ([], epoch[:j]):
                    for kind, tw in _torn(w, _overlay(old, done + pre, w.offset, len(w.data))):
                        states.append(State(r.name, kind, tuple((x.offset, x.data) for x in done + pre + [tw])))
            done = done + epoch
        unique: dict[str, State] = {}
        for s in states:
            unique.setdefault(s.key(old), s)
        return list(unique.values())


# ---------------------------------------------------------------- judging


@dataclass
class Verdict:
    state: State
    problems: list[str] = field(default_factory=list)
    grub_slot: str = ""
    python_slot: str = ""
    window: bool = False  # GRUB's first boot follows the old grubenv while the GPT is new


class Judge:
    """Materialises states over a scratch disk and judges them; GRUB runs once per batch."""

    def __init__(self, work: Path, usrs: list[Usr]):
        self.work = work
        self.usrs = usrs
        self.verified: dict[tuple[int, str, str, int], bool] = {}
        self.scratch = work / "scratch.raw"

    # --- the parts

    @staticmethod
    def _envfile(disk: Path, dest: Path) -> bool:
        try:
            dest.write_bytes(esp.read_file(disk, grub.ENV_PATH))
            return True
        except esp.EspError:
            return False

    def grub_views(self, envs: list[Path | None]) -> list[dict[str, str]]:
        """What GRUB's own code makes of each grubenv: the chosen slot and the values it loaded."""
        lines = []
        for i, env in enumerate(envs):
            lines.append("set A_prio=0\nset A_tries=0\nset A_ok=0\nset B_prio=0\nset B_tries=0\nset B_ok=0\n"
                         "set A_hash=\nset B_hash=\nset A_hashoff=0\nset B_hashoff=0\n")
            if env is not None:
                lines.append(f'if ! load_env --file "(host){env}"; then echo "C{i} LOADFAIL"; fi\n')
            lines.append('obelisk_select\n'
                         f'echo "C{i} slot=$obelisk_slot A=$A_prio,$A_tries,$A_ok B=$B_prio,$B_tries,$B_ok '
                         'ao=$A_hashoff bo=$B_hashoff"\n'
                         f'echo "C{i}A $A_hash"\necho "C{i}B $B_hash"\n')
        script = grub.render_select() + "".join(lines) + 'echo "CASES-DONE"\nreboot\n'
        gdir = self.work / "grub"
        if not gdir.exists():
            shutil.copytree(EMU_MODULES, gdir / "x86_64-emu")
        (gdir / "grub.cfg").write_text(script)
        devmap = self.work / "device.map"
        devmap.write_text("")
        res = subprocess.run(["grub-emu", "-d", str(gdir), "-m", str(devmap)], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, errors="replace", timeout=600)
        out = ANSI.sub("", res.stdout.replace("\r", ""))
        if "CASES-DONE" not in out:
            raise AssertionError(f"grub-emu did not finish: {out[-2000:]} {res.stderr[-2000:]}")
        views: list[dict[str, str]] = [{} for _ in envs]
        for ln in out.splitlines():
            head, _, rest = ln.partition(" ")
            if not head.startswith("C") or not head[1:].rstrip("AB").isdigit():
                continue
            i = int(head[1:].rstrip("AB"))
            if head.endswith("A"):
                views[i]["A_hash"] = rest.strip()
            elif head.endswith("B"):
                views[i]["B_hash"] = rest.strip()
            elif rest == "LOADFAIL":
                views[i]["loadfail"] = "1"
            else:
                for part in rest.split():
                    k, _, v = part.partition("=")
                    views[i][k] = v
        return views

    @staticmethod
    def _selectable(view: dict[str, str]) -> list[str]:
        out = []
        for n in ("A", "B"):
            p, t, s = (int(x or 0) for x in view.get(n, "0,0,0").split(","))
            if p > 0 and (t > 0 or s == 1):
                out.append(n)
        return out

    def _apply(self, writes: tuple[tuple[int, bytes], ...]) -> None:
        fd = os.open(self.scratch, os.O_RDWR)
        try:
            for off, data in writes:
                os.pwrite(fd, data, off)
        finally:
            os.close(fd)

    def _restore(self, before: Path, ranges: list[tuple[int, int]]) -> None:
        """Put the before-image's bytes back where a state (or the reconcile after it) wrote."""
        src, dst = os.open(before, os.O_RDONLY), os.open(self.scratch, os.O_RDWR)
        try:
            for off, n in ranges:
                os.pwrite(dst, os.pread(src, n, off).ljust(n, b"\0"), off)
        finally:
            os.close(src)
            os.close(dst)

    def judge(self, r: Recorded, states: list[State]) -> list[Verdict]:
        """Judge ``states`` of operation ``r`` (see the module docstring for the rules)."""
        d = self.work / f"j-{r.name}"
        d.mkdir(exist_ok=True)
        ends = [self._grub_choice_of(r.before), self._grub_choice_of(r.after)]
        verdicts, raw_envs, next_envs, pythons, slot_checks = [], [], [], [], []
        runner = CliRunner()
        from bootloader.cli import app as boot_app
        shutil.copyfile(r.before, self.scratch)
        base_digests = self._slot_digests(self.scratch)
        slot_lo, slot_hi = A_FIRST * SECTOR, B_FIRST * SECTOR + (SLOT_MIB << 20)
        for i, s in enumerate(states):
            v = Verdict(s)
            verdicts.append(v)
            self._apply(s.writes)
            touches_slots = any(off < slot_hi and off + len(data) > slot_lo for off, data in s.writes)
            with diskio.recording(self.scratch) as rec:
                self._judge_one(v, i, d, raw_envs, next_envs, pythons, slot_checks, runner, boot_app,
                                self._slot_digests(self.scratch) if touches_slots else base_digests)
            dirty = [(off, len(data)) for off, data in s.writes]
            dirty += [(o.offset, len(o.data)) for o in rec.ops if isinstance(o, diskio.Write)]
            self._restore(r.before, dirty)
        views = self.grub_views(raw_envs + next_envs)
        n = len(states)
        for i, v in enumerate(verdicts):
            view, nview = views[i], views[n + i]
            v.grub_slot = view.get("slot", "")
            if raw_envs[i] is None or view.get("loadfail"):
                v.problems.append("GRUB cannot load the grubenv")
            if not v.grub_slot:
                v.problems.append(f"GRUB finds no slot to boot ({view})")
            if v.grub_slot and v.grub_slot not in ends:
                v.problems.append(f"GRUB picks {v.grub_slot}, neither the choice before ({ends[0]}) "
                                  f"nor after ({ends[1]})")
            for name in self._selectable(view):
                off = int(view.get("ao" if name == "A" else "bo", "0") or 0)
                root_hash = view.get(f"{name}_hash", "")
                if (USR_A if name == "A" else USR_B, slot_checks[i][name][0], root_hash, off) not in self.verified:
                    self._apply(v.state.writes)  # the scratch disk is the before-image again: put this state back
                    self.need_verify(slot_checks[i], name, root_hash, off)
                    self._restore(r.before, [(o, len(b)) for o, b in v.state.writes])
                if not self._verify_digest(slot_checks[i], name, root_hash, off):
                    v.problems.append(f"slot {name} is selectable but does not verify with the grubenv's root hash")
            py = pythons[i]
            v.python_slot = {USR_A: "A", USR_B: "B"}.get(py, "") if py is not None else ""
            if nview.get("slot", "") != v.python_slot:
                v.problems.append(f"after reconcile GRUB picks {nview.get('slot')!r}, "
                                  f"slots.next_index {v.python_slot!r}")
            v.window = bool(v.grub_slot) and v.grub_slot != v.python_slot
        return verdicts

    def _judge_one(self, v: Verdict, i: int, d: Path, raw_envs: list, next_envs: list, pythons: list,
                   slot_checks: list, runner: CliRunner, boot_app: object, digests: dict) -> None:
        try:
            gpt.read_table(self.scratch)
        except gpt.GptError as exc:
            v.problems.append(f"GPT unreadable: {exc}")
        env = d / f"raw{i}.env"
        raw_envs.append(env if self._envfile(self.scratch, env) else None)
        slot_checks.append(digests)
        res = runner.invoke(boot_app, ["status", "--disk", str(self.scratch), "--json"])
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            v.problems.append(f"boot status raised {type(res.exception).__name__}: {res.exception}")
        elif res.exit_code != 0 and not v.problems:
            v.problems.append(f"boot status failed: {res.output.strip()[-300:]}")
        try:
            pythons.append(slots.next_index(slots.read_slots(self.scratch)))
        except gpt.GptError as exc:
            pythons.append(None)
            if not v.problems:
                v.problems.append(f"slots unreadable after reconcile: {exc}")
        nenv = d / f"next{i}.env"
        next_envs.append(nenv if self._envfile(self.scratch, nenv) else None)

    def _grub_choice_of(self, disk: Path) -> str:
        env = self.work / f"end-{disk.name}.env"
        return self.grub_views([env if self._envfile(disk, env) else None])[0].get("slot", "")

    def _slot_digests(self, disk: Path) -> dict[str, tuple[str, Path, int]]:
        """Each slot's content digest (the bytes are read again only when a verify needs them)."""
        out = {}
        with open(disk, "rb") as f:
            for name, first in (("A", A_FIRST), ("B", B_FIRST)):
                f.seek(first * SECTOR)
                out[name] = (hashlib.sha256(f.read(SLOT_MIB << 20)).hexdigest(), disk, first * SECTOR)
        return out

    def _verify_digest(self, checks: dict[str, tuple[str, Path, int]], name: str, root_hash: str,
                       hashoff: int) -> bool:
        digest, _, _ = checks[name]
        key = (USR_A if name == "A" else USR_B, digest, root_hash, hashoff)
        return self.verified.get(key, False)

    def need_verify(self, checks: dict[str, tuple[str, Path, int]], name: str, root_hash: str, hashoff: int) -> None:
        """Run ``veritysetup verify`` now (while the state is on the scratch disk) unless cached."""
        digest, disk, off = checks[name]
        key = (USR_A if name == "A" else USR_B, digest, root_hash, hashoff)
        if key in self.verified:
            return
        ok = False
        if len(root_hash) == 64 and hashoff > 0 and all(c in "0123456789abcdef" for c in root_hash):
            img = self.work / "verify.img"
            with open(disk, "rb") as f:
                f.seek(off)
                img.write_bytes(f.read(SLOT_MIB << 20))
            res = run(["veritysetup", "verify", img, img, root_hash, f"--hash-offset={hashoff}",
                       f"--data-blocks={hashoff // 4096}"], check=False)
            ok = res.returncode == 0
        self.verified[key] = ok


def grubenv_burn(disk: Path, name: str) -> None:
    """What GRUB's ``save_env`` does when it boots a trial: the slot's working tries go down by one."""
    env = loader.read_env(disk)
    assert env is not None
    slot = env.slots[name]
    slot.tries = max(0, slot.tries - 1)
    esp.rewrite_file(disk, grub.ENV_PATH, grub.render_env(env.to_vars()))
