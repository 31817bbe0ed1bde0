"""Stage formats: the extra artifacts asked for: ``qcow2`` (qemu-img) and ``pxe`` (the slot's kernel,
and its initramfs with a second, uncompressed newc archive appended that carries ``/usr.img``:
the kernel unpacks concatenated archives, so the initramfs finds /usr without a disk)."""

from __future__ import annotations

from pathlib import Path

from builder import fsutil
from obelisk import tools

DEPENDS = ("disk", "usr", "tree")
PXE_USR_NAME = "usr.img"  # where the PXE initramfs finds /usr (filesystem + verity tree)


def inputs(ctx) -> dict:
    return {"formats": sorted(set(ctx.formats) - {"raw"}), "epoch": ctx.epoch}


def run(ctx, out: Path) -> dict:
    made: list[str] = []
    if "qcow2" in ctx.formats:
        ctx.log("formats: qcow2")
        tools.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", ctx["disk"].path("disk.raw"),
                   out / "disk.qcow2"], timeout=3600)
        made.append("disk.qcow2")
    if "pxe" in ctx.formats:
        ctx.log("formats: pxe")
        boot = ctx["tree"].path("tree") / "usr/lib/obelisk/boot"
        fsutil.copy_file(boot / "vmlinuz", out / "vmlinuz")
        with (out / "initrd").open("wb") as f:
            first = (boot / "initrd.img").read_bytes()
            # The kernel takes an uncompressed archive only at a 4-byte aligned offset; zeros are skipped.
            f.write(first + b"\0" * ((4 - len(first) % 4) % 4))
            fsutil.write_newc(f, [(PXE_USR_NAME, 0o444, ctx["usr"].path("usr.img"))], mtime=ctx.epoch)
        made += ["vmlinuz", "initrd"]
    return {"files": made}
