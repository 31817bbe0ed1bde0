"""GRUB's slot choice equals the Python model's (bootloader.slots.next_index / boot_next).

The exact selection and try-burning functions that grub.cfg contains (``grub.render_select``)
run under ``grub-emu`` (real GRUB 2.06 from Debian, the same script engine as the EFI build)
over a table of attribute cases: every priority/tries/successful combination obelisk writes
(P 0..15 and T 0..15 in the values the slot operations produce, S 0/1, for both slots).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from testlib import need_tools

from bootloader import grub, slots

EMU_MODULES = Path("/usr/lib/grub/x86_64-emu")

# Priorities/tries around every boundary the scripts have (0, 1, 2, ties, the maximum 15).
PRIOS = [0, 1, 2, 3, 7, 14, 15]
TRIES = [0, 1, 2, 5, 14, 15]


def _slot(index: int, p: int, t: int, s: int) -> slots.Slot:
    return slots.Slot(index, f"USR-{'A' if index == 3 else 'B'}", uuid.uuid4(), p, t, bool(s), 0, 0)


def _cases() -> list[tuple[int, int, int, int, int, int]]:
    per_slot = list(itertools.product(PRIOS, TRIES, [0, 1]))
    return [a + b for a, b in itertools.product(per_slot, per_slot)]


def _script(cases: list[tuple[int, ...]]) -> str:
    out = [grub.render_select()]
    for i, (ap, at, as_, bp, bt, bs) in enumerate(cases):
        out.append(
            f"set A_prio={ap}\nset A_tries={at}\nset A_ok={as_}\nset B_prio={bp}\nset B_tries={bt}\nset B_ok={bs}\n"
            "obelisk_select\n"
            # The burn exactly as grub.cfg's boot entries do it (save_env aside: the host fs is no disk).
            'if [ "$obelisk_slot" = A ]; then if [ "$A_tries" -gt 0 ]; then obelisk_burn_A; fi; fi\n'
            'if [ "$obelisk_slot" = B ]; then if [ "$B_tries" -gt 0 ]; then obelisk_burn_B; fi; fi\n'
            f'echo "CASE {i} slot=$obelisk_slot A_tries=$A_tries B_tries=$B_tries"\n'
        )
    out.append('echo "CASES-DONE"\nreboot\n')
    return "".join(out)


def _run_emu(tmp_path: Path, script: str) -> str:
    need_tools("grub-emu")
    if not EMU_MODULES.is_dir():
        pytest.fail("grub-emu modules missing: apt-get install grub-emu (make setup)")
    gdir = tmp_path / "grub"
    shutil.copytree(EMU_MODULES, gdir / "x86_64-emu")
    (gdir / "grub.cfg").write_text(script)
    devmap = tmp_path / "device.map"
    devmap.write_text("")
    res = subprocess.run(["grub-emu", "-d", str(gdir), "-m", str(devmap)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, errors="replace", timeout=300)
    return res.stdout.replace("\r", "")


def test_grub_choice_matches_python_model(tmp_path: Path) -> None:
    cases = _cases()
    out = _run_emu(tmp_path, _script(cases))
    assert "CASES-DONE" in out, out[-2000:]
    got: dict[int, tuple[str, int, int]] = {}
    for line in out.splitlines():
        if "CASE " in line:
            parts = line[line.index("CASE "):].split()
            fields = dict(p.split("=", 1) for p in parts[2:])
            got[int(parts[1])] = (fields["slot"], int(fields["A_tries"]), int(fields["B_tries"]))
    assert len(got) == len(cases)
    mismatches = []
    for i, (ap, at, as_, bp, bt, bs) in enumerate(cases):
        model = [_slot(3, ap, at, as_), _slot(4, bp, bt, bs)]
        chosen = slots.next_index(model)
        want_slot = {None: "", 3: "A", 4: "B"}[chosen]
        want_a = at - 1 if chosen == 3 and at > 0 else at
        want_b = bt - 1 if chosen == 4 and bt > 0 else bt
        if got[i] != (want_slot, want_a, want_b):
            mismatches.append(((ap, at, as_, bp, bt, bs), got[i], (want_slot, want_a, want_b)))
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ, e.g. {mismatches[:5]}"


def test_grub_cfg_parses_and_env_loads(tmp_path: Path) -> None:
    """The full grub.cfg's env handling under grub-emu: load_env of a block rendered by Python."""
    env = grub.LoaderEnv()
    env.slots["A"] = grub.SlotEnv(prio=2, tries=0, ok=True, base=(2, 0, 1), hash="ab" * 32, hashoff=8192,
                                  version="1.2.3")
    env.slots["B"] = grub.SlotEnv(prio=3, tries=1, ok=False, base=(3, 1, 0), hash="cd" * 32, hashoff=4096,
                                  version="1.2.4")
    envfile = tmp_path / "grubenv"
    envfile.write_bytes(grub.render_env(env.to_vars()))
    script = (f'load_env --file "(host){envfile}"\n' + grub.render_select() +
              'obelisk_select\necho "PICK slot=$obelisk_slot ver=$B_version off=$B_hashoff"\n'
              'if [ "$B_hash" = "' + "cd" * 32 + '" ]; then echo HASH-OK; fi\nreboot\n')
    out = _run_emu(tmp_path, script)
    # (GRUB's terminal wraps at 80 columns, so the hash is compared inside GRUB.)
    assert "PICK slot=B ver=1.2.4 off=4096" in out and "HASH-OK" in out, out[-1500:]
