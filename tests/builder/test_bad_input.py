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
        (lambda t: t.replace('name = "tiny"', 'name = "Tiny Image"'), "name: 'Tiny Image' is not an image name"),
        (lambda t: t.replace('name = "tiny"', 'name = "tiny\\n"'), "name: 'tiny\\n' is not an image name"),
        (lambda t: t.replace('version = "0.1.0"', 'version = "1.0.0\\n"'), "version: '1.0.0\\n' is not a version"),
        (lambda t: "app_id = 'my app'\n" + t, "app_id: 'my app' is not an app id"),
        (lambda t: "app_id = '{x}\\nNAME=evil'\n" + t, "is not an app id"),
        (lambda t: "app_id = ''\n" + t, "app_id: '' is not an app id"),
        (lambda t: t.replace('pretty_name = "obelisk tiny (busybox)"', 'pretty_name = "x\\nID=evil"'),
         "pretty_name: 'x\\nID=evil' holds the control character '\\n'"),
        (lambda t: t.replace('pretty_name = "obelisk tiny (busybox)"', 'pretty_name = "' + "x" * 201 + '"'),
         "pretty_name: String should have at most 200 characters"),
        (lambda t: t.replace('package = "linux-image-amd64"', 'package = "-oDir::Etc=/tmp"'),
         "kernel.package: '-oDir::Etc=/tmp' is not a Debian package"),
        (lambda t: t.replace('kind = "tiny"', 'kind = "tiny"\nbusybox_package = "busybox static"'),
         "source.busybox_package: 'busybox static' is not a Debian package"),
        (lambda t: t.replace('"virtio_pci",', '"virtio_pci", "../../x",'),
         "kernel.modules[1]: '../../x' is not a kernel"),
        (lambda t: "source_date_epoch = 100000000000000\n" + t, "source_date_epoch: Input should be less than or"),
        (lambda t: "files = ['no-such-overlay']\n" + t, "is not a folder: each entry is an overlay folder"),
        (lambda t: "x = " + "[" * 100_000 + "]" * 100_000 + "\n" + t, "nested too deeply"),
        (lambda t: "x = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n" + t, "nested too deeply"),
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


@pytest.mark.timeout(60)
def test_definitions_that_are_not_text(tmp_path: Path) -> None:
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (2 << 20) + "\n" + TINY)
    for path, expect in ((binary, "not UTF-8 text"), (big, "too big for an image definition"),
                         (tmp_path, "is a directory, not a TOML image definition")):
        with pytest.raises(definition.DefinitionError, match=expect):
            definition.load(path)


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
    line = one_line_error(_build("images/tiny.toml", tmp_path / "out", "--version", "1.0.0\n"))
    assert line.startswith("error: --version '1.0.0\\n': use a dotted number"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("args", "head", "expect"), [
    (["--version", "1.0+local"], "", "an update payload cannot carry this release"),
    ([], "app_id = 'my app'\n", "app_id: 'my app' is not an app id"),
    ([], 'pretty_name = "a\\u0007b"\n', "holds the control character"),
])
def test_refused_before_the_first_stage(tmp_path: Path, args: list[str], head: str, expect: str) -> None:
    """What a later stage (the payload's, the os-release writer) would refuse is refused before any stage
    runs: a fresh cache stays empty."""
    defn = tmp_path / "tiny.toml"
    defn.write_text(head + TINY.replace('pretty_name = "obelisk tiny (busybox)"\n', "" if "pretty" in head else
                                        'pretty_name = "obelisk tiny (busybox)"\n'))
    cache = tmp_path / "cache"
    proc = _build(defn, tmp_path / "out", *args, cache=cache)
    line = one_line_error(proc)
    assert expect in line, line
    assert not (cache / "stages").exists() and not (tmp_path / "out").exists()


def test_out_and_cache_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    line = one_line_error(_build("images/tiny.toml", blocker / "out", cache=tmp_path / "cache"))
    assert "output folder" in line and "is not a folder this user can write: choose another with --out" in line
    line = one_line_error(_build("images/tiny.toml", tmp_path / "out", cache=blocker / "cache"))
    assert "stage cache" in line and "cannot create it: Not a directory: choose another with --cache" in line
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
