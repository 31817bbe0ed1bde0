"""`obelisk install`: a verified release's disk image onto a bare-metal disk, with a config in OEM.

As flatcar-install and coreos-installer do it: everything that can be checked is checked before the
disk is touched (the release's signature and checksums, the config, the target: a block device,
free, large enough), each refusal overridable by ``--force`` and each override printed; then the
image streams in, the backup GPT moves to the disk's end, and the config lands in OEM where the
image's first boot looks for it. ``plan`` is the checking half (what ``--dry-run`` prints); ``run``
the writing half (bootloader.install).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bootloader import install as disk_install
from bootloader import install_disk
from builder.install_release import ReleaseSource, open_release
from cloudconfig import ignition
from cloudconfig.datasources import DEFAULT_FILES, read_file
from cloudconfig.validate import validate_bytes
from obelisk.errors import ObeliskError

OEM_MOUNT = PurePosixPath("/usr/share/oem")
# The datasource file that lives in OEM (mounted at /usr/share/oem, as on Flatcar): where the config goes.
OEM_CONFIG = next(PurePosixPath(p).relative_to(OEM_MOUNT) for p in DEFAULT_FILES
                  if PurePosixPath(p).is_relative_to(OEM_MOUNT)).as_posix()


class InstallRefused(ObeliskError):
    """A check failed before anything was written."""


@dataclass
class Config:
    path: Path
    kind: str  # "cloud-config" | "script" | "ignition" (Butane is translated to Ignition)
    data: bytes


@dataclass
class Plan:
    release: ReleaseSource
    target: install_disk.Target
    config: Config | None
    overrides: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        r, t = self.release, self.target
        parts = ", ".join(f"{p.number} {p.name or p.fs or '-'}" for p in t.partitions) or "none"
        out = [f"release {r.name} {r.version} from {r.where}: signed by {r.signer}, {r.size:,}-byte disk image",
               f"target {t.path}: {t.kind}, {t.size:,} bytes, {t.sector_size}-byte sectors, "
               f"{t.label or 'no'} partition table (partitions: {parts})"]
        out += [f"override (--force): {o}" for o in self.overrides]
        out.append(f"write {r.size:,} bytes of disk.raw to {t.path} (everything on it is lost)")
        if t.size > r.size:
            out.append(f"move the backup GPT to the disk's end (sector {t.size // t.sector_size - 1})")
        if self.config:
            out.append(f"put {self.config.path} ({self.config.kind}, {len(self.config.data):,} bytes) in the "
                       f"OEM partition as /{OEM_CONFIG} (read at first boot from {OEM_MOUNT / OEM_CONFIG})")
        return out


def load_config(path: Path) -> Config:
    """A cloud-config, script, Ignition or Butane file, validated by the engines the host runs."""
    raw = read_file(path, "config file")
    if ignition.detect(raw):
        data, rep = ignition.translate(raw)  # Butane becomes the Ignition JSON the host reads
        if data is None:
            first = rep.errors[0].text() if rep.errors else "invalid"
            raise InstallRefused(f"{path}: invalid Ignition/Butane config ({len(rep.errors)} error(s); {first}) — "
                                 "nothing was written", hint="check it with 'obelisk cloudconfig validate'")
        return Config(path, "ignition", data)
    rep = validate_bytes(raw)
    if rep.kind not in ("cloud-config", "script") or rep.errors:
        first = rep.errors[0].text() if rep.errors else f"it is {rep.kind}, not #cloud-config, a script or Ignition"
        raise InstallRefused(f"{path}: invalid config ({first}) — nothing was written",
                             hint="check it with 'obelisk cloudconfig validate'")
    return Config(path, rep.kind, raw)


def plan(source: str, disk: Path, *, config: Path | None = None, key: Path | None = None,
         force: bool = False) -> Plan:
    """Every check, nothing written. Raises InstallRefused for a refusal --force does not (or may) override."""
    cfg = load_config(config) if config is not None else None
    release = open_release(source, key)
    target = install_disk.inspect(disk)
    found = install_disk.refusals(target, release.size)
    hard = [r.reason for r in found if not r.forceable or not force]
    if hard:
        can = all(r.forceable for r in found)
        raise InstallRefused(f"refusing to install: {'; '.join(hard)} — nothing was written",
                             hint="pass --force to install anyway" if can else "")
    return Plan(release, target, cfg, [r.reason for r in found])


def run(p: Plan, progress: disk_install.Progress | None = None) -> list[str]:
    """Write what ``p`` says; returns what was done, one line each."""
    disk, r = p.target.path, p.release
    chunks = r.open()  # a URL is requested before the first write: a refusal leaves the disk untouched
    try:
        _written, head = disk_install.stream_image(chunks, disk, r.size, progress, expect_sha256=r.sha256)
    except disk_install.InstallError:
        raise
    except ObeliskError as exc:  # the source failed mid-stream (a download broke off)
        raise disk_install.InstallError(f"{exc}; the disk holds no partition table now — nothing on it boots") \
            from None
    done = [f"wrote {r.size:,} bytes of {r.name} {r.version} to {disk} (sha256 {r.sha256[:16]}... verified)"]
    if p.config is not None:
        table = disk_install.image_table(head, r.size)
        oem = disk_install.oem_partition(table)
        disk_install.write_oem_file(disk, oem.first_lba * table.sector_size, OEM_CONFIG, p.config.data)
        done.append(f"put {p.config.path} in OEM (partition {oem.index}) as /{OEM_CONFIG}")
    disk_install.write_head(disk, head)
    done += [f"gpt: {line}" for line in disk_install.fit_gpt(disk)]
    why = disk_install.reread_partitions(disk)
    if why:
        done.append(f"note: the kernel did not re-read the partition table ({why}): partition devices appear "
                    "after 'partprobe' or a reboot")
    return done
