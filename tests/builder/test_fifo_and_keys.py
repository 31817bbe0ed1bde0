"""A FIFO where a file is expected never hangs a command; `image test` checks its signing key up front.

Each command runs with a subprocess deadline (and the test with its own), so a regression that
opens the FIFO fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from bhelpers import TINY, Built, obelisk, one_line_error

DEADLINE = 60  # seconds one refused command may take (CLI start-up on a busy machine included)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    p = tmp_path / "pipe"
    os.mkfifo(p)
    return p


def _refused(*args: str | Path, env: dict[str, str] | None = None) -> str:
    return one_line_error(obelisk(*args, env=env, timeout=DEADLINE))


@pytest.mark.timeout(4 * DEADLINE)
def test_build_refuses_fifos(tmp_path: Path, fifo: Path) -> None:
    out = tmp_path / "out"
    assert "is a FIFO, not a TOML image definition" in _refused("image", "build", fifo, "--out", out)
    assert "is a FIFO, not a private key" in _refused("image", "build", "images/tiny.toml", "--out", out,
                                                      "--key", fifo, "--cache", tmp_path / "cache")
    defn = tmp_path / "t.toml"
    defn.write_text(f'trusted_keys = ["{fifo}"]\n' + TINY)
    assert "trusted_keys: " in (line := _refused("image", "build", defn, "--out", out)) and "is a FIFO" in line
    defn.write_text(TINY.replace('kind = "tiny"', f'kind = "tarball"\npath = "{fifo}"'))
    assert "source.path: " in (line := _refused("image", "build", defn, "--out", out)) and "not a tarball" in line
    assert not out.exists()


@pytest.mark.timeout(6 * DEADLINE)
def test_inspect_and_verify_refuse_fifos(tiny: Built, tmp_path: Path, fifo: Path) -> None:
    assert "is a FIFO, not a disk image" in _refused("image", "inspect", fifo)
    rel = tmp_path / "rel"
    rel.mkdir()
    for name in ("SHA256SUMS", "SHA256SUMS.sig", "update.payload"):
        (rel / name).hardlink_to(tiny.release / name)
    os.mkfifo(rel / "release.json")
    assert "release.json: is a FIFO" in _refused("image", "inspect", rel)
    assert "is a FIFO, not a public key" in _refused("image", "verify", tiny.release, "--key", fifo)
    v = obelisk("image", "verify", rel, "--key", tiny.pub, timeout=DEADLINE)
    assert v.returncode == 1 and "BAD release.json: unreadable:" in v.stdout and "is a FIFO" in v.stdout, v.stdout
    (rel / "SHA256SUMS").unlink()
    os.mkfifo(rel / "SHA256SUMS")
    assert "SHA256SUMS: is a FIFO" in _refused("image", "verify", rel, "--key", tiny.pub)


@pytest.mark.timeout(6 * DEADLINE)
def test_key_commands_refuse_fifos(tiny: Built, tmp_path: Path, fifo: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("hello\n")
    assert "is a FIFO, not a private key" in _refused("key", "sign", doc, "--key", fifo)
    assert "is a FIFO, not a file to sign" in _refused("key", "sign", fifo, "--key", tiny.key)
    obelisk("key", "sign", doc, "--key", tiny.key, check=True, timeout=DEADLINE)
    assert "is a FIFO, not a public key" in _refused("key", "verify", doc, "--key", fifo)
    assert "is a FIFO, not a signature" in _refused("key", "verify", doc, fifo, "--key", tiny.pub)
    assert "is a FIFO, not a signed file" in _refused("key", "verify", fifo, doc.with_suffix(".txt.sig"),
                                                     "--key", tiny.pub)
    ok = obelisk("key", "verify", doc, "--key", tiny.pub, timeout=DEADLINE)
    assert ok.returncode == 0 and "signed by" in ok.stdout


@pytest.mark.timeout(4 * DEADLINE)
def test_image_test_says_up_front_which_key_the_release_trusts(tiny: Built, tmp_path: Path) -> None:
    """Signed by one key, tested with another (or with no --key and the development key): refused before any
    VM boots, naming the key the release trusts and the key that was tried."""
    trusted = tiny.release_json["signing_key_id"]
    other = tmp_path / "other"
    other_id = obelisk("key", "generate", other, check=True, timeout=DEADLINE).stdout.split()[-1]
    line = _refused("image", "test", tiny.release, "--scenario", "update", "--key", other / "obelisk.key")
    assert f"trusts only key {trusted}" in line and f"is key {other_id}" in line, line
    assert "pass --key with the private key" in line
    empty = {"XDG_DATA_HOME": str(tmp_path / "no-data")}
    line = _refused("image", "test", tiny.release, "--scenario", "rollback", env=empty)
    assert f"trusts key {trusted}" in line and "the development key (no --key given) does not exist" in line
    dev = tmp_path / "data/obelisk/dev-key"
    obelisk("key", "generate", dev, check=True, timeout=DEADLINE)
    line = _refused("image", "test", tiny.release, "--scenario", "power-loss",
                    env={"XDG_DATA_HOME": str(dev.parents[1])})
    assert f"trusts only key {trusted}" in line and "the development key (no --key given)" in line
    assert not (tiny.release / "test").exists(), "the check must come before any scenario work"


@pytest.mark.timeout(2 * DEADLINE)
def test_image_test_refuses_a_fifo_release_json(tiny: Built, tmp_path: Path) -> None:
    rel = tmp_path / "rel"
    rel.mkdir()
    shutil.copyfile(tiny.release / "SHA256SUMS", rel / "disk.raw")  # any regular file: nothing boots
    os.mkfifo(rel / "release.json")
    assert "release.json: is a FIFO" in _refused("image", "test", rel, "--scenario", "boot")
