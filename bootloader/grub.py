"""grub.cfg rendering and the grubenv format (this module is their one owner).

Upstream GRUB 2.06 cannot read GPT attribute bits, so obelisk keeps a copy of each USR slot's
priority/tries/successful in a GRUB environment block on the ESP (``/EFI/obelisk/grubenv``).
grub.cfg implements ``gptprio.next`` over those variables: highest priority among slots with
tries > 0 or successful, ties to the lower index (A), priority 0 never; it burns a try with
``save_env`` before a trial boot (an if-chain, GRUB has no arithmetic).

Per slot X (A or B) the env holds the working values GRUB reads and changes (``X_prio``,
``X_tries``, ``X_ok``), the GPT attributes they were mirrored from (``X_base`` = ``P,T,S``), and
the slot's boot data (``X_hash``, ``X_hashoff``, ``X_version``). ``bootloader.loader`` uses
``X_base`` to tell the loader's news (base equals the GPT: take the working values into the GPT)
from a stale env (base differs: obelisk wrote the GPT last and the GPT wins).

The attribute lines come first so they sit in the block's first 512-byte sector: an in-place
rewrite of that sector is atomic on the disks we target, so a crash never tears a slot's state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bootloader.layout import SLOT_INDEX, SLOT_NAMES, SLOT_UUID
from obelisk.errors import ObeliskError

ENV_SIZE = 1024
ENV_SIGNATURE = "# GRUB Environment Block\n"
ENV_PATH = "EFI/obelisk/grubenv"
CFG_PATH = "EFI/obelisk/grub.cfg"
EFI_PATH = "EFI/BOOT/BOOTX64.EFI"
PREFIX = "/EFI/obelisk"
# Serial-console markers the VM harness watches for.
MARK_BOOTING = "OBELISK-GRUB: booting slot"
MARK_NO_SLOT = "OBELISK-GRUB-FAIL: no bootable USR slot"
MARK_LOAD_FAIL = "OBELISK-GRUB-FAIL: cannot load kernel of slot"
# Not fatal: the chosen slot's kernel or initrd did not load and GRUB boots the other slot instead.
MARK_FALLBACK = "OBELISK-GRUB: cannot load kernel of slot"
# grubenv variable GRUB sets when a slot's kernel or initrd did not load ("B:linux:1.2.0"), and clears
# when that slot loads again; the kernel command line of the fallback boot carries it as obelisk.loadfail=.
LOADFAIL_VAR = "obelisk_loadfail"
LOADFAIL_RE = re.compile(r"^[AB]:(linux|initrd|boot):[A-Za-z0-9.+~_-]{0,64}$")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GrubEnvError(ObeliskError, ValueError):
    """A grubenv block that GRUB would not read; the message names the problem."""


@dataclass
class SlotEnv:
    """One slot's state in the env. ``base`` is the GPT (P, T, S) the working values came from."""

    prio: int = 0
    tries: int = 0
    ok: bool = False
    base: tuple[int, int, int] = (0, 0, 0)
    hash: str = ""
    hashoff: int = 0
    version: str = ""

    @property
    def working(self) -> tuple[int, int, int]:
        return (self.prio, self.tries, int(self.ok))


@dataclass
class LoaderEnv:
    slots: dict[str, SlotEnv] = field(default_factory=lambda: {n: SlotEnv() for n in SLOT_NAMES})
    # GRUB's mark of a slot whose kernel or initrd did not load ("B:linux:1.2.0"; "" for none): kept
    # through every rewrite, last in the block (GRUB's save_env then never moves the attribute lines).
    loadfail: str = ""

    def to_vars(self) -> dict[str, str]:
        out: dict[str, str] = {}
        # Attributes first (first sector), boot data after: see the module docstring.
        for n in SLOT_NAMES:
            s = self.slots[n]
            out[f"{n}_prio"] = str(s.prio)
            out[f"{n}_tries"] = str(s.tries)
            out[f"{n}_ok"] = "1" if s.ok else "0"
            out[f"{n}_base"] = ",".join(str(v) for v in s.base)
        for n in SLOT_NAMES:
            s = self.slots[n]
            out[f"{n}_hash"] = s.hash
            out[f"{n}_hashoff"] = str(s.hashoff)
            out[f"{n}_version"] = s.version
        out[LOADFAIL_VAR] = self.loadfail
        return out

    @classmethod
    def from_vars(cls, env: dict[str, str]) -> LoaderEnv:
        def num(key: str, lo: int, hi: int) -> int:
            raw = env.get(key, "0")
            if not raw.isdigit() or not lo <= int(raw) <= hi:
                raise GrubEnvError(f"grubenv: {key}={raw!r} is not a number in {lo}..{hi}")
            return int(raw)

        le = cls()
        for n in SLOT_NAMES:
            base_raw = env.get(f"{n}_base", "0,0,0").split(",")
            if len(base_raw) != 3 or not all(p.isdigit() for p in base_raw):
                raise GrubEnvError(f"grubenv: {n}_base={env.get(f'{n}_base')!r} is not P,T,S")
            p, t, s = (int(v) for v in base_raw)
            le.slots[n] = SlotEnv(
                prio=num(f"{n}_prio", 0, 15),
                tries=num(f"{n}_tries", 0, 15),
                ok=num(f"{n}_ok", 0, 1) == 1,
                base=(p, t, s),
                hash=env.get(f"{n}_hash", ""),
                hashoff=num(f"{n}_hashoff", 0, 1 << 62),
                version=env.get(f"{n}_version", ""),
            )
        mark = env.get(LOADFAIL_VAR, "")
        # A mark that is not one GRUB writes is dropped, never an error: it only ever explains a fallback.
        le.loadfail = mark if LOADFAIL_RE.match(mark) else ""
        return le


def render_env(variables: dict[str, str]) -> bytes:
    """A GRUB environment block: signature, ``name=value`` lines, ``#`` padding to 1024 bytes."""
    body = ENV_SIGNATURE
    for k, v in variables.items():
        if not _NAME.match(k):
            raise GrubEnvError(f"grubenv: bad variable name {k!r}")
        # GRUB escapes these itself; we never need them, so refuse rather than get it subtly wrong.
        if any(c in v for c in "\n\\"):
            raise GrubEnvError(f"grubenv: value of {k} contains a newline or backslash")
        body += f"{k}={v}\n"
    data = body.encode()
    if len(data) > ENV_SIZE:
        raise GrubEnvError(f"grubenv: {len(data)} bytes of variables do not fit in {ENV_SIZE}")
    return data + b"#" * (ENV_SIZE - len(data))


def parse_env(data: bytes) -> dict[str, str]:
    """Variables of an env block (as GRUB reads it: comment lines and padding skipped)."""
    if len(data) != ENV_SIZE:
        raise GrubEnvError(f"grubenv: block is {len(data)} bytes, expected {ENV_SIZE}")
    if not data.startswith(ENV_SIGNATURE.encode()):
        raise GrubEnvError("grubenv: missing '# GRUB Environment Block' signature")
    out: dict[str, str] = {}
    for line in data.decode(errors="replace").split("\n")[1:]:
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out[k] = v
    return out


def slot_vars_block(name: str) -> str:
    return f"""\
  if [ "${name}_prio" -gt "$obelisk_best" ]; then
    if [ "${name}_tries" -gt 0 ]; then
      set obelisk_slot={name}
      set obelisk_best="${name}_prio"
    elif [ "${name}_ok" = 1 ]; then
      set obelisk_slot={name}
      set obelisk_best="${name}_prio"
    fi
  fi
"""


def render_select() -> str:
    """The GRUB functions that choose a slot (gptprio.next) and burn a try.

    This exact text is what grub.cfg contains and what the grub-emu test runs against the
    Python model's table of cases.
    """
    chooser = "function obelisk_select {\n  set obelisk_slot=\n  set obelisk_best=0\n"
    for n in SLOT_NAMES:  # index order: ties go to the lower index (strict -gt)
        chooser += slot_vars_block(n)
    chooser += "}\n"
    burn = ""
    for n in SLOT_NAMES:
        chain = "  if [ \"${n}_tries\" = 1 ]; then set {n}_tries=0\n".replace("{n}", n)
        for t in range(2, 16):
            chain += f'  elif [ "${n}_tries" = {t} ]; then set {n}_tries={t - 1}\n'
        chain += "  fi\n"
        burn += f"function obelisk_burn_{n} {{\n{chain}}}\n"
    return chooser + burn


def cmdline(n: str, extra: str = "") -> str:
    """The kernel command line of slot ``n`` (GRUB expands the ``$`` variables from the env).

    ``obelisk.version`` is the slot's version from the env and ``obelisk.loadfail`` the slot GRUB
    could not load in this run before it fell back to ``n`` (empty when none): the initramfs keeps
    them in its records (``bootloader/initramfs/functions.sh``) and ignores values of another shape.
    """
    args = [f"obelisk.usr=PARTUUID={SLOT_UUID[n]}", f"obelisk.usrhash=${n}_hash", f"obelisk.usrhashoffset=${n}_hashoff",
            f"obelisk.slot={n}", "obelisk.trial=$obelisk_trial", f"obelisk.version=${n}_version",
            "obelisk.loadfail=$obelisk_fell", "root=PARTLABEL=ROOT", "console=ttyS0",
            # panic=1: a dm-verity panic resets the machine, so GRUB's tries logic takes over.
            "panic=1", "quiet", extra]
    return " ".join(a for a in args if a)


def render_boot(*, extra_cmdline: str = "") -> str:
    """The GRUB functions that start a slot, and the fallback when its kernel or initrd does not load.

    ``obelisk_start`` burns a try of ``$obelisk_slot`` if it is on trial, then ``obelisk_boot_<X>``
    loads its kernel and initrd and boots; only when that fails does it return, with
    ``obelisk_failed`` set to ``X:linux:<version>``, ``X:initrd:<version>`` (or ``X:boot:...`` when
    ``boot`` itself returned). ``obelisk_other``
    sets ``obelisk_slot`` to the other slot when the gptprio rule could choose it (priority > 0,
    tries left or successful), else to nothing.
    """
    out = ""
    for n in SLOT_NAMES:
        idx = SLOT_INDEX[n]
        out += f"""\
function obelisk_boot_{n} {{
  set obelisk_usr=($obelisk_disk,gpt{idx})
  set obelisk_kdir=/lib/obelisk/boot
  if [ ! -f "$obelisk_usr$obelisk_kdir/vmlinuz" ]; then set obelisk_kdir=/usr/lib/obelisk/boot; fi
  echo "{MARK_BOOTING} {n} version=${n}_version trial=$obelisk_trial tries_left=${n}_tries"
  if linux "$obelisk_usr$obelisk_kdir/vmlinuz" {cmdline(n, extra_cmdline)}; then
    # The kernel loads again: clear its old mark (an initrd failure below sets it anew).
    if regexp '^{n}:' "${LOADFAIL_VAR}"; then
      set {LOADFAIL_VAR}=
      save_env --file "$obelisk_env" {LOADFAIL_VAR}
    fi
    if initrd "$obelisk_usr$obelisk_kdir/initrd.img"; then
      boot
      set obelisk_failed="{n}:boot:${n}_version"
    else
      set obelisk_failed="{n}:initrd:${n}_version"
    fi
  else
    set obelisk_failed="{n}:linux:${n}_version"
  fi
}}
"""
    out += "function obelisk_start {\n"
    for n in SLOT_NAMES:
        out += f"""\
  if [ "$obelisk_slot" = {n} ]; then
    set obelisk_trial=0
    if [ "${n}_tries" -gt 0 ]; then
      obelisk_burn_{n}
      if ! save_env --file "$obelisk_env" {n}_tries; then
        echo "OBELISK-GRUB-FAIL: cannot burn a try of slot {n} in $obelisk_env"
        sleep 5
        halt
      fi
      set obelisk_trial=1
    fi
    obelisk_boot_{n}
  fi
"""
    out += "}\nfunction obelisk_other {\n"
    out += '  if [ "$obelisk_slot" = A ]; then set obelisk_cand=B; else set obelisk_cand=A; fi\n  set obelisk_slot=\n'
    for n in SLOT_NAMES:
        out += f"""\
  if [ "$obelisk_cand" = {n} ]; then
    if [ "${n}_prio" -gt 0 ]; then
      if [ "${n}_tries" -gt 0 ]; then set obelisk_slot={n}; elif [ "${n}_ok" = 1 ]; then set obelisk_slot={n}; fi
    fi
  fi
"""
    out += "}\n"
    return out


def render_cfg(*, extra_cmdline: str = "") -> str:
    """The ESP's grub.cfg. ``$root`` is the ESP (GRUB was loaded from it; prefix /EFI/obelisk).

    A slot whose kernel or initrd does not load (a good slot included) is marked in the env
    (``obelisk_loadfail``) and GRUB boots the other slot if it can, in the same run: no reboot loop.
    """
    fell_back = (f"{MARK_FALLBACK} $obelisk_first ($obelisk_failed) from $obelisk_usr$obelisk_kdir: "
                 "falling back to slot $obelisk_slot")
    return f"""\
# obelisk boot selection: generated by bootloader.grub, do not edit.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
set gfxpayload=text

set obelisk_env="($root){PREFIX}/grubenv"
regexp --set=1:obelisk_disk '^([^,]+)' "$root"
set A_prio=0
set A_tries=0
set A_ok=0
set B_prio=0
set B_tries=0
set B_ok=0
set obelisk_trial=0
set {LOADFAIL_VAR}=
if ! load_env --file "$obelisk_env"; then
  echo "OBELISK-GRUB: cannot read $obelisk_env"
fi
set obelisk_fell=

{render_select()}{render_boot(extra_cmdline=extra_cmdline)}
obelisk_select
if [ -z "$obelisk_slot" ]; then
  echo "{MARK_NO_SLOT} (A: P=$A_prio T=$A_tries S=$A_ok, B: P=$B_prio T=$B_tries S=$B_ok)"
  sleep 5
  halt
fi
set obelisk_first=$obelisk_slot
obelisk_start
# Only here when the chosen slot's kernel or initrd did not load: mark it, then try the other slot.
set {LOADFAIL_VAR}="$obelisk_failed"
set obelisk_fell="$obelisk_failed"
if ! save_env --file "$obelisk_env" {LOADFAIL_VAR}; then
  echo "OBELISK-GRUB: cannot record the load failure in $obelisk_env"
fi
obelisk_other
if [ -n "$obelisk_slot" ]; then
  echo "{fell_back}"
  obelisk_start
  echo "{MARK_LOAD_FAIL} $obelisk_slot ($obelisk_failed) from $obelisk_usr$obelisk_kdir either"
else
  echo "{MARK_LOAD_FAIL} $obelisk_first ($obelisk_failed) from $obelisk_usr$obelisk_kdir, and no other slot is bootable"
fi
sleep 2
reboot
"""


# Modules built into BOOTX64.EFI: no module files on the ESP, nothing to go stale.
GRUB_MODULES = [
    "part_gpt", "fat", "squash4", "gzio", "xzio", "lzopio", "linux", "normal", "serial", "terminal", "echo", "test",
    "loadenv", "regexp", "search", "configfile", "reboot", "halt", "sleep", "probe", "efi_gop",
]
