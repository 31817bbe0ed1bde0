"""Caching (warm rebuild, one changed input), reproducibility, and crash safety under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bhelpers import EPOCH, OBELISK, REPO, TINY, Built, build_json, obelisk


def _rebuild(tiny: Built, out: Path, *args: str | Path) -> dict:
    return build_json("images/tiny.toml", "--out", out, "--cache", tiny.cache, "--key", tiny.key,
                      "--format", "raw,qcow2,pxe", *args)


def test_warm_rebuild_is_all_cached(tiny: Built, tmp_path: Path) -> None:
    # The first rebuild is normally all cached too; it is not asserted because in a shared checkout
    # someone may have changed code a stage depends on since the session's build (a correct rerun).
    _rebuild(tiny, tmp_path / "a")
    res = _rebuild(tiny, tmp_path / "b")
    assert res["all_cached"], res["stages"]
    assert (tmp_path / "b/tiny/0.1.0/disk.raw").read_bytes() == (tmp_path / "a/tiny/0.1.0/disk.raw").read_bytes()
    # Publishing the same version again swaps the whole folder in one step and leaves nothing behind.
    _rebuild(tiny, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b/tiny").iterdir()) == ["0.1.0"]
    assert obelisk("image", "verify", tmp_path / "b/tiny/0.1.0", "--key", tiny.pub).returncode == 0


def test_one_changed_input_reruns_only_dependent_stages(tiny: Built, tmp_path: Path) -> None:
    # A bigger ROOT partition: the OS tree, /usr, ESP and payload stay; ROOT/OEM, the disk and the release rerun.
    _rebuild(tiny, tmp_path / "base")  # up to date with the checkout (see above)
    defn = tmp_path / "tiny.toml"
    defn.write_text(TINY.replace("root_mib = 32", "root_mib = 40"))
    res = build_json(defn, "--out", tmp_path / "out", "--cache", tiny.cache, "--key", tiny.key,
                     "--format", "raw,qcow2,pxe")
    rerun = sorted(n for n, s in res["stages"].items() if not s["cached"])
    assert rerun == ["disk", "formats", "fs", "release"]
    # A new version changes /usr (os-release), so everything after the source stages reruns.
    res = build_json("images/tiny.toml", "--version", "0.2.0", "--out", tmp_path / "out", "--cache", tiny.cache,
                     "--key", tiny.key, "--format", "raw,qcow2,pxe")
    cached = sorted(n for n, s in res["stages"].items() if s["cached"])
    assert cached == ["python", "rootfs"]
    assert res["release"]["version"] == "0.2.0"


def test_two_clean_builds_are_byte_identical(tiny: Built, tmp_path: Path) -> None:
    """A second build from an empty cache (only the downloaded .debs are shared, to save the network)."""
    ref = Path(_rebuild(tiny, tmp_path / "ref")["release_dir"])
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "debs").symlink_to(tiny.cache / "debs")
    obelisk("image", "build", "images/tiny.toml", "--out", tmp_path / "out", "--cache", cache, "--key", tiny.key,
            "--format", "raw,qcow2,pxe", check=True)
    for name in ("usr.img", "update.payload", "disk.raw", "disk.qcow2", "initrd", "SHA256SUMS", "release.json"):
        assert (tmp_path / "out/tiny/0.1.0" / name).read_bytes() == (ref / name).read_bytes(), name


def _start(out: Path, cache: Path, key: Path, version: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}
    return subprocess.Popen([OBELISK, "image", "build", "images/tiny.toml", "--out", out, "--cache", cache,
                             "--key", key, "--version", version], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(pred, proc: subprocess.Popen[bytes], timeout: float = 300) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _half_entries(cache: Path) -> list[Path]:
    """Cache entries without their meta.json (a complete entry always has one)."""
    return [d for d in (cache / "stages").glob("*/*") if not d.name.startswith(".tmp-") and
            not (d / "meta.json").is_file()]


@pytest.mark.parametrize("point", ["usr", "disk", "publish"])
def test_sigkill_leaves_no_half_release(tiny: Built, tmp_path: Path, point: str) -> None:
    """Kill -9 while a stage (or the publish step) is writing: no release, no half cache entry,
    and the next build succeeds and verifies."""
    version = {"usr": "0.3.0", "disk": "0.3.1", "publish": "0.3.2"}[point]
    out = tmp_path / "out"
    proc = _start(out, tiny.cache, tiny.key, version)
    if point == "publish":
        pred = lambda: any(out.glob("tiny/.tmp-*"))  # noqa: E731
    else:
        pred = lambda: any((tiny.cache / "stages" / point).glob(".tmp-*"))  # noqa: E731
    try:
        hit = _wait_for(pred, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert hit, f"the build never reached {point}"
    assert not (out / "tiny" / version).exists()
    assert not _half_entries(tiny.cache)
    obelisk("image", "build", "images/tiny.toml", "--out", out, "--cache", tiny.cache, "--key", tiny.key,
            "--version", version, check=True)
    assert not list(out.glob("tiny/.tmp-*")), "stale temporary folder not cleaned"
    v = obelisk("image", "verify", out / "tiny" / version, "--key", tiny.pub)
    assert v.returncode == 0, v.stdout
