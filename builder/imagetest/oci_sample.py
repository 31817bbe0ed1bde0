"""A tiny container image for the host scenario, made without a registry or a container tool: the
build machine's static busybox in one layer, written as an OCI image layout in a tar (what
`podman load -i` takes as an oci-archive)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from obelisk.errors import ObeliskError

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "sleep", "cat", "ip", "hostname", "true")
REF = "localhost/obelisk-sample:1"


class SampleImageError(ObeliskError, RuntimeError):
    pass


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def layer(busybox: Path = BUSYBOX) -> bytes:
    if not busybox.is_file():
        raise SampleImageError(f"{busybox} is missing: install busybox-static (make setup) for the sample image")
    data = busybox.read_bytes()
    bb = tarfile.TarInfo("bin/busybox")
    bb.size, bb.mode = len(data), 0o755
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [_dir("bin"), (bb, data), _dir("tmp")]
    for applet in APPLETS:
        link = tarfile.TarInfo(f"bin/{applet}")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        entries.append((link, None))
    return _tar_bytes(entries)


def _blob(files: dict[str, bytes], data: bytes, media_type: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    files[f"blobs/sha256/{digest}"] = data
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def write_archive(dest: Path, busybox: Path = BUSYBOX) -> str:
    """Write the oci-archive to ``dest``; returns its reference name."""
    files: dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}'}
    lay = layer(busybox)
    layer_desc = _blob(files, lay, "application/vnd.oci.image.layer.v1.tar")
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"], "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}
    config_desc = _blob(files, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    man_desc = _blob(files, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    man_desc["annotations"] = {"org.opencontainers.image.ref.name": REF}
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [man_desc]}).encode()
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [_dir("blobs"), _dir("blobs/sha256")]
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        entries.append((info, data))
    dest.write_bytes(_tar_bytes(entries))
    return REF
