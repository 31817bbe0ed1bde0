"""What the target of an apply runs now: version, app id and arch, read from the target itself.

On the booted disk that is the running ``/usr`` (``/usr/share/obelisk/release``). On any other disk
(a disk image, another host's disk) it is the release file inside the slot ``target`` keeps, the
last good slot, read straight out of its squashfs with ``unsquashfs -o OFFSET -cat`` (no mount,
no loop device). A slot with a pending trial is never the one kept, so it is never what is compared.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from bootloader import layout, slots
from obelisk import tools
from obelisk import update_conf as config
from obelisk.errors import ObeliskError
from update_engine import omaha
from update_engine.errors import ApplyError
from update_engine.target import Target

RELEASE_IN_SLOT = "share/obelisk/release"  # the squashfs holds /usr's content at its root
MAX_RELEASE_BYTES = 64 << 10


@dataclass(frozen=True)
class Installed:
    """What the kept slot holds. ``where`` names it for messages ("slot A, the last good one, of disk.raw")."""

    version: str | None
    app_id: str | None
    arch: str | None
    where: str


def host_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def from_release(rel: dict[str, str], where: str, *, arch_default: str | None = None) -> Installed:
    return Installed(rel.get("VERSION") or None, rel.get("APPID") or None, rel.get("ARCH") or arch_default, where)


def of_running(release: Path = config.RELEASE_FILE) -> Installed:
    """The running host: its release file; the arch it runs on when the file does not say."""
    return from_release(config.read_release(release), "the running host", arch_default=host_arch())


def of_slot(disk: Path, index: int) -> Installed:
    """The release file inside slot ``index`` of ``disk``; an ApplyError when the slot holds no readable one."""
    name = layout.name_of(index)
    where = f"slot {name} (the last good one) of {disk}"
    try:
        offset, _length = slots.slot_extent(disk, index)
        res = tools.run(["unsquashfs", "-o", str(offset), "-cat", disk, RELEASE_IN_SLOT], timeout=60,
                        check=False)
    except (ObeliskError, OSError) as exc:
        raise ApplyError(f"cannot read what {where} runs: {exc}", omaha.ERR_POSTINSTALL) from None
    if res.returncode != 0 or not res.stdout.strip() or len(res.stdout) > MAX_RELEASE_BYTES:
        why = (res.stderr.strip().splitlines() or ["no release file"])[-1]
        raise ApplyError(f"cannot read /usr/{RELEASE_IN_SLOT} from {where} ({why})", omaha.ERR_POSTINSTALL)
    try:
        rel = config.parse_kv(res.stdout, f"/usr/{RELEASE_IN_SLOT} in slot {name}")
    except config.UpdateConfigError as exc:
        raise ApplyError(str(exc), omaha.ERR_POSTINSTALL) from None
    return from_release(rel, where)


def of_target(disk: Path, tgt: Target, *, booted: bool) -> Installed | None:
    """What ``tgt`` keeps runs; None when no slot of ``disk`` is bootable (nothing to compare with)."""
    if booted:
        return of_running()
    if tgt.keep is None:
        return None
    return of_slot(disk, tgt.keep)
