"""OS trees from an OCI image layout, a tarball (docker export style) and a directory."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

from bhelpers import TINY, Built, obelisk

from builder.stages import rootfs


def _tiny_root(tiny: Built) -> Path:
    roots = [p / "root" for p in (tiny.cache / "stages/rootfs").iterdir() if (p / "meta.json").is_file()]
    return roots[0]


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _layer(files: dict[str, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data or b"")
            tf.addfile(info, io.BytesIO(data or b""))
    return gzip.compress(buf.getvalue(), mtime=0)


def make_oci(layout: Path, root: Path) -> None:
    base = io.BytesIO()
    with tarfile.open(fileobj=base, mode="w") as tf:
        tf.add(root, arcname=".")
    layers = [_blob(layout, gzip.compress(base.getvalue(), compresslevel=1, mtime=0)),
              _blob(layout, _layer({"etc/.wh.hostname": None, "usr/share/from-oci": b"layer two\n"}))]
    config = _blob(layout, json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    manifest = _blob(layout, json.dumps({"schemaVersion": 2, "config": config, "layers": layers}).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {**manifest, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))


def test_build_from_an_oci_layout(tiny: Built, tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    make_oci(layout, _tiny_root(tiny))
    defn = tmp_path / "tiny.toml"  # named tiny so that images/files/tiny still applies
    defn.write_text(TINY.replace('kind = "tiny"', f'kind = "oci"\npath = "{layout}"\ntag = "latest"'))
    obelisk("image", "build", defn, "--out", tmp_path / "out", "--cache", tiny.cache, "--key", tiny.key, check=True)
    rel = tmp_path / "out/tiny/0.1.0"
    x = tmp_path / "x"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", x, rel / "usr.img", "share/from-oci", "bin/busybox"],
                   check=True, capture_output=True)
    assert (x / "share/from-oci").read_text() == "layer two\n"
    assert (x / "bin/busybox").is_file()
    assert obelisk("image", "verify", rel, "--key", tiny.pub).returncode == 0


def test_tarball_and_directory_sources_unpack(tiny: Built, tmp_path: Path) -> None:
    """The rootfs stage's unpackers on their own (a full build is shown by the OCI test)."""
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin/hello").write_text("#!/bin/sh\necho hi\n")
    (src / "etc").mkdir()
    (src / "etc/motd").write_text("hi\n")
    tar = tmp_path / "export.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(src, arcname=".")
    root = tmp_path / "root"
    root.mkdir()
    rootfs._untar(tar, root, lambda _msg: None)
    rootfs.merge_usr(root)
    assert (root / "bin").is_symlink() and (root / "usr/bin/hello").is_file()
    assert (root / "etc/motd").read_text() == "hi\n"
