"""One tiny build shared by the builder tests (a session fixture)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from bhelpers import Built, obelisk


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("key")
    obelisk("key", "generate", d, check=True)
    return d / "obelisk.key", d / "obelisk.pub"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # OBELISK_TEST_CACHE keeps downloaded .debs (and stages) across runs on a developer machine.
    return Path(os.environ.get("OBELISK_TEST_CACHE") or tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path], shared_cache: Path) -> Built:
    """images/tiny.toml built once for the whole session (raw + qcow2 + pxe)."""
    need = ("mksquashfs", "veritysetup", "mkfs.fat", "mcopy", "mkfs.ext4", "grub-mkimage", "qemu-img",
            "apt-get", "dpkg-deb", "depmod", "cgpt", "sgdisk")
    missing = [t for t in need if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
    if missing:
        pytest.fail(f"missing tools {missing}: run 'make setup'")
    out = tmp_path_factory.mktemp("out")
    key, pub = keypair
    obelisk("image", "build", "images/tiny.toml", "--out", out, "--cache", shared_cache, "--key", key,
            "--format", "raw,qcow2,pxe", check=True)
    return Built(out, shared_cache, key, pub, out / "tiny" / "0.1.0")
