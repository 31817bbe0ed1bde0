"""GPT slot operations: obelisk (in-process and through the CLI) against the real cgpt.

`python -m bench gpt [--n N] [--cli-n N]`. Each row times the same operation on twin disks
(USR-typed for obelisk, ChromeOS-kernel-typed for cgpt, since upstream cgpt only prioritizes
kernel partitions) and prints obelisk's time over cgpt's (below 1: obelisk is faster). cgpt
always pays a process start; the CLI rows pay ours (Python + typer), the in-process rows none.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bootloader import gpt, slots
from obelisk.tools import require, run


def _disk(path: Path, part_type: uuid.UUID) -> Path:
    usr_a = slots.encode(0, priority=1, successful=True)
    specs = [
        gpt.PartitionSpec(1, "EFI-SYSTEM", slots.ESP_TYPE, uuid.UUID(int=1), 2048, 2048),
        gpt.PartitionSpec(3, "USR-A", part_type, slots.USR_A_UUID, 4096, 2048, usr_a),
        gpt.PartitionSpec(4, "USR-B", part_type, slots.USR_B_UUID, 6144, 2048),
        gpt.PartitionSpec(9, "ROOT", slots.ROOT_TYPE, uuid.UUID(int=9), 8192, 4096),
    ]
    gpt.create_table(path, 8 * 1024 * 1024, specs, uuid.UUID(int=1))
    return path


def _time(n: int, op: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(n):
        op(i)
    return (time.perf_counter() - start) / n


def _row(name: str, ours: float, theirs: float) -> None:
    print(f"{name:<44} obelisk {ours * 1000:8.2f} ms   cgpt {theirs * 1000:8.2f} ms   ratio {ours / theirs:6.2f}",
          flush=True)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench gpt")
    ap.add_argument("--n", type=int, default=200, help="operations per in-process row")
    ap.add_argument("--cli-n", type=int, default=10, help="operations per CLI row")
    args = ap.parse_args(argv)
    cgpt = require("cgpt")
    with tempfile.TemporaryDirectory(prefix="bench-gpt-") as tmp:
        ours = _disk(Path(tmp) / "usr.raw", slots.USR_TYPE)
        theirs = _disk(Path(tmp) / "kernel.raw", slots.CHROMEOS_KERNEL_TYPE)
        cli = [sys.executable, "-m", "bootloader.cli"]

        def cgpt_set(i: int) -> None:
            run([cgpt, "add", "-i", "4", "-P", str(i % 16), "-T", str(i % 7), "-S", str(i % 2), theirs])

        def cgpt_prio(i: int) -> None:
            run([cgpt, "prioritize", "-i", str(3 + i % 2), theirs])

        set_in = _time(args.n, lambda i: slots.set_attrs(ours, 4, priority=i % 16, tries=i % 7, successful=bool(i % 2)))
        set_cgpt = _time(args.n, cgpt_set)
        _row(f"set P/T/S, in-process (n={args.n})", set_in, set_cgpt)
        prio_in = _time(args.n, lambda i: slots.prioritize(ours, 3 + i % 2))
        prio_cgpt = _time(args.n, cgpt_prio)
        _row(f"prioritize, in-process (n={args.n})", prio_in, prio_cgpt)
        read_in = _time(args.n, lambda i: slots.read_slots(ours))
        read_cgpt = _time(args.n, lambda i: run([cgpt, "show", "-i", "4", "-P", theirs]))
        _row(f"read slot state, in-process (n={args.n})", read_in, read_cgpt)
        set_cli = _time(args.cli_n, lambda i: run([*cli, "set", "4", "-P", str(i % 16), "--disk", ours]))
        _row(f"set through the CLI (n={args.cli_n})", set_cli, set_cgpt)
        prio_cli = _time(args.cli_n, lambda i: run([*cli, "prioritize", str(3 + i % 2), "--disk", ours]))
        _row(f"prioritize through the CLI (n={args.cli_n})", prio_cli, prio_cgpt)
        assert "No problems found" in run(["sgdisk", "-v", ours]).stdout
