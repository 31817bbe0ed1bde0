"""Bad input: each a one-line error (exit 2), nothing published, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from bhelpers import REPO, TINY, Built, obelisk, one_line_error
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from builder import definition


def _build(defn: Path | str, out: Path, *extra: str | Path, cache: Path | None = None,
           key: Path | None = None) -> subprocess.CompletedProcess[str]:
    args: list[str | Path] = ["image", "build", defn, "--out", out]
    if cache:
        args += ["--cache", cache]
    if key:
        args += ["--key", key]
    return obelisk(*args, *extra)


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (lambda t: "surprise = 1\n" + t, ": surprise: unknown key"),
        (lambda t: t.replace("usr_mib = 64", 'usr_mib = "big"'), "disk.usr_mib: Input should be a valid integer"),
        (lambda t: t.replace('kind = "tiny"', 'kind = "gentoo"'), "unknown source kind 'gentoo'"),
        (lambda t: t.replace('name = "tiny"', 'name = "Tiny Image"'), "name: String should match pattern"),
        (lambda t: t.replace("[disk]", "[disk]\nsize_mib = 100"), "too small for the layout: it needs at least"),
        (lambda t: t.replace("[kernel]", "[kernel]\nflavour = 'rt'"), "kernel.flavour: unknown key"),
        (lambda t: t.replace('formats = ["raw"]', 'formats = ["iso"]'), "formats[0]"),
        (lambda t: t + "[[oops", "not valid TOML"),
    ],
)
def test_bad_definitions(tmp_path: Path, change, expect: str) -> None:
    """In-process (the CLI's start-up costs seconds on a busy machine); the CLI shape is checked below."""
    defn = tmp_path / "bad.toml"
    defn.write_text(change(TINY))
    with pytest.raises(definition.DefinitionError) as info:
        definition.load(defn)
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{defn}: ") and expect in line, line


def test_bad_definition_through_the_cli(tmp_path: Path) -> None:
    defn = tmp_path / "bad.toml"
    defn.write_text("surprise = 1\n" + TINY)
    line = one_line_error(_build(defn, tmp_path / "out"))
    assert line == f"error: {defn}: surprise: unknown key"
    assert not (tmp_path / "out").exists()


def test_missing_definition_and_bad_options(tmp_path: Path) -> None:
    line = one_line_error(_build(tmp_path / "none.toml", tmp_path / "out"))
    assert "no such image definition" in line
    line = one_line_error(_build("images/tiny.toml", tmp_path / "out", "--format", "raw,iso"))
    assert "unknown format iso" in line
    line = one_line_error(_build("images/tiny.toml", tmp_path / "out", "--version", "not a version"))
    assert "--version" in line
    assert not (tmp_path / "out").exists()


def test_missing_host_tool_names_the_package(tmp_path: Path) -> None:
    """mksquashfs hidden in a private mount namespace (/dev/null bound over it: not executable);
    a PATH change alone cannot hide it, because tools.require also looks in /usr/bin."""
    script = (f"mount --bind /dev/null $(command -v mksquashfs) && "
              f"exec {REPO}/.venv/bin/obelisk image build images/tiny.toml --out {tmp_path}/out")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                          capture_output=True, text=True)
    line = one_line_error(proc)
    assert "mksquashfs" in line and "apt-get install squashfs-tools" in line, line
    assert not (tmp_path / "out").exists()


def test_signing_key_problems(tiny: Built, tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = one_line_error(_build("images/tiny.toml", out, key=tmp_path / "missing.key", cache=tiny.cache))
    assert "missing.key" in line
    rsa_key = tmp_path / "rsa.key"
    rsa_key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    line = one_line_error(_build("images/tiny.toml", out, key=rsa_key, cache=tiny.cache))
    assert "not an Ed25519 key" in line
    # A definition that trusts only another key refuses to be signed with ours.
    other = tmp_path / "other"
    obelisk("key", "generate", other, check=True)
    defn = tmp_path / "t.toml"
    defn.write_text(TINY.replace('formats = ["raw"]', f'formats = ["raw"]\ntrusted_keys = ["{other}/obelisk.pub"]'))
    line = one_line_error(_build(defn, out, key=tiny.key, cache=tiny.cache))
    assert "not one of the image's trusted_keys" in line
    assert not out.exists()


def test_tree_larger_than_its_partition_says_the_size(tiny: Built, tmp_path: Path) -> None:
    defn = tmp_path / "tiny.toml"
    defn.write_text(TINY.replace("usr_mib = 64", "usr_mib = 8"))
    line = one_line_error(_build(defn, tmp_path / "out", cache=tiny.cache, key=tiny.key))
    assert "/usr needs" in line and "set disk.usr_mib to at least" in line, line
    assert not (tmp_path / "out" / "tiny").exists()
