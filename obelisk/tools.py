"""The one wrapper around external tools (mksquashfs, veritysetup, sgdisk, qemu, ...).

Every shell-out in obelisk goes through :func:`run` so that a missing tool names the Debian
package to install and a failing tool becomes one clear error carrying the tool's own message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from obelisk.errors import ObeliskError

# tool -> Debian package that ships it (bookworm).
TOOL_PACKAGES: dict[str, str] = {
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "veritysetup": "cryptsetup-bin",
    "grub-mkstandalone": "grub-common",
    "grub-mkimage": "grub-common",
    "grub-editenv": "grub-common",
    "grub-emu": "grub-emu",
    "mmdebstrap": "mmdebstrap",
    "sgdisk": "gdisk",
    "cgpt": "cgpt",
    "sfdisk": "fdisk",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ssh-keyscan": "openssh-client",
    "mkfs.vfat": "dosfstools",
    "mkfs.fat": "dosfstools",
    "fsck.fat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mdir": "mtools",
    "mdel": "mtools",
    "umount": "mount",
    "mtype": "mtools",
    "mkfs.ext4": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "tune2fs": "e2fsprogs",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "cpio": "cpio",
    "busybox": "busybox-static",
    "ip": "iproute2",
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "curl": "curl",
    "systemctl": "systemd",
    "dd": "coreutils",
    "xz": "xz-utils",
    "zstd": "zstd",
    "depmod": "kmod",
    "modinfo": "kmod",
    "dpkg-deb": "dpkg",
    "ldd": "libc-bin",
    "apt-get": "apt",
    "apt-cache": "apt",
    "cp": "coreutils",
    "wall": "bsdutils",
}


class ToolError(ObeliskError, RuntimeError):
    """A tool is missing or failed; ``str()`` is one line fit for the user."""


class ToolMissing(ToolError):
    pass


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def package_for(tool: str) -> str:
    return TOOL_PACKAGES.get(tool, tool)


def require(tool: str) -> str:
    """Absolute path of ``tool``, or ToolMissing naming the Debian package."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise ToolMissing(
            f"{tool} is not installed: install it with 'apt-get install {package_for(tool)}' "
            "(or run 'make setup')"
        )
    return found


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    capture: bool = True,
) -> Result:
    """Run a tool; raise ToolError with the tool's own message on failure.

    ``env`` is added to the current environment (not a replacement).
    """
    args = [os.fspath(a) for a in argv]
    args[0] = require(args[0]) if "/" not in args[0] else args[0]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    text = not isinstance(input, bytes)
    try:
        proc = subprocess.run(
            args,
            input=input,
            cwd=cwd,
            env=full_env,
            timeout=timeout,
            capture_output=capture,
            text=text,
            errors="replace" if text else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{Path(args[0]).name} did not finish within {timeout:.0f}s") from exc
    out = proc.stdout or ""
    err = proc.stderr or ""
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    if isinstance(err, bytes):
        err = err.decode(errors="replace")
    if check and proc.returncode != 0:
        msg = _last_line(err) or _last_line(out) or f"exit code {proc.returncode}"
        raise ToolError(f"{Path(args[0]).name} failed: {msg}")
    return Result(args, proc.returncode, out, err)
