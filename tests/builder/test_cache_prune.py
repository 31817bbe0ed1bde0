"""The stage cache stays bounded: `obelisk image cache list|prune` and the cap applied after each build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bhelpers import OBELISK, REPO, Built, build_json, obelisk, one_line_error

from builder import cache as stage_cache
from builder import fsutil
from builder.errors import BuildError
from builder.pipeline import ENTRY_DIGEST

MIB = 1024 * 1024
RELEASE_FILES = ("usr.img", "update.payload", "disk.raw", "SHA256SUMS", "release.json")


def _build(cache: Path, tiny: Built, out: Path, *args: str | Path) -> dict:
    return build_json("images/tiny.toml", "--out", out, "--cache", cache, "--key", tiny.key, "--format", "raw",
                      *args)


def _copy_entries(tiny: Built, res: dict, cache: Path) -> None:
    """A cache of its own holding just the entries of one tiny build (the shared one is not pruned)."""
    (cache / "stages").mkdir(parents=True)
    (cache / "debs").symlink_to(tiny.cache / "debs")
    for name, stage in res["stages"].items():
        (cache / "stages" / name).mkdir()
        subprocess.run(["cp", "-a", "--sparse=always", tiny.cache / "stages" / name / stage["key"],
                        cache / "stages" / name / stage["key"]], check=True)


def _filler(cache: Path, n: int, size: int, used: float) -> Path:
    """An entry nobody will use again, last used at ``used``."""
    entry = cache / "stages" / "tree" / f"filler{n:02d}"
    entry.mkdir(parents=True)
    (entry / "blob").write_bytes(os.urandom(size))
    (entry / "meta.json").write_text("{}")
    (entry / ENTRY_DIGEST).write_text(fsutil.entry_digest(entry, skip=ENTRY_DIGEST) + "\n")
    os.utime(entry, (used, used))
    return entry


def _same_release(a: Path, b: Path) -> None:
    for name in RELEASE_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _entries_intact(cache: Path) -> None:
    for e in stage_cache.entries(cache):
        recorded = (e.path / ENTRY_DIGEST).read_text().strip()
        assert fsutil.entry_digest(e.path, skip=ENTRY_DIGEST) == recorded, e.path


@pytest.mark.timeout(900)
def test_cap_prunes_least_recently_used_and_rebuilds_stay_correct(tiny: Built, tmp_path: Path) -> None:
    ref = _build(tiny.cache, tiny, tmp_path / "ref")  # the shared cache, up to date with the checkout
    ref_dir = Path(ref["release_dir"])
    cache = tmp_path / "cache"
    _copy_entries(tiny, ref, cache)
    own = sum(e.size for e in stage_cache.entries(cache))
    now = time.time()
    fillers = [_filler(cache, n, 4 * MIB, now - 3600 + 60 * n) for n in range(6)]  # filler00 is the oldest
    cap = own + 2 * (4 * MIB + 64 * 1024) + MIB  # room for this build's entries and the two newest fillers

    # A warm build past the cap: every stage still comes from the cache, the oldest fillers go.
    res = _build(cache, tiny, tmp_path / "a", "--cache-max-size", str(cap))
    assert res["all_cached"], res["stages"]
    pruned = res["cache_pruned"]
    assert [Path(e["path"]).name for e in pruned["removed"]] == [f.name for f in fillers[:4]]
    assert [f.exists() for f in fillers] == [False] * 4 + [True] * 2
    assert pruned["after"] <= cap
    _same_release(Path(res["release_dir"]), ref_dir)
    listed = json.loads(obelisk("image", "cache", "list", "--cache", cache, "--json", check=True).stdout)
    assert listed["total"] == pruned["after"]
    assert {e["key"] for e in listed["entries"]} >= {s["key"] for s in ref["stages"].values()}

    # A new version under a cap that cannot hold two builds: the new build keeps what it uses
    # (rootfs and python are shared with 0.1.0), and 0.1.0's own entries go, oldest first.
    small = own + MIB
    res2 = _build(cache, tiny, tmp_path / "b", "--version", "0.2.0", "--cache-max-size", str(small))
    used2 = {s["key"] for s in res2["stages"].values()}
    kept = {e.key for e in stage_cache.entries(cache)}
    assert used2 <= kept
    gone = {s["key"] for s in ref["stages"].values()} - kept
    assert gone and not gone & used2
    assert not any(f.exists() for f in fillers)
    # 0.1.0 again: only the stages that were pruned rerun, and the release is byte for byte the same.
    res3 = _build(cache, tiny, tmp_path / "c", "--cache-max-size", "unlimited")
    rerun = {s["key"] for s in res3["stages"].values() if not s["cached"]}
    assert rerun == gone
    _same_release(Path(res3["release_dir"]), ref_dir)
    _entries_intact(cache)

    # `cache prune` by hand: a dry run removes nothing; --max-size 0 empties the cache.
    before = {e.key for e in stage_cache.entries(cache)}
    dry = json.loads(obelisk("image", "cache", "prune", "--cache", cache, "--max-size", "0", "--dry-run", "--json",
                             check=True).stdout)
    assert dry["dry_run"] and {e["key"] for e in dry["removed"]} == before
    assert {e.key for e in stage_cache.entries(cache)} == before
    proc = obelisk("image", "cache", "prune", "--cache", cache, "--max-size", "0", check=True)
    assert "removed" in proc.stdout and stage_cache.entries(cache) == []
    # ... and a build from the emptied cache is still the same release.
    res4 = _build(cache, tiny, tmp_path / "d")
    assert not any(s["cached"] for s in res4["stages"].values())
    _same_release(Path(res4["release_dir"]), ref_dir)


def _many(cache: Path, count: int = 40) -> None:
    now = time.time()
    for n in range(count):
        entry = _filler(cache, n, 64 * 1024, now - 1000 + n)
        for i in range(30):  # many files, so a kill can land inside a removal
            (entry / f"f{i}").write_bytes(b"x" * 4096)
        (entry / ENTRY_DIGEST).write_text(fsutil.entry_digest(entry, skip=ENTRY_DIGEST) + "\n")
        os.utime(entry, (now - 1000 + n, now - 1000 + n))


def _prune_cmd(cache: Path) -> list[str | Path]:
    return [OBELISK, "image", "cache", "prune", "--cache", cache, "--max-size", "0"]


@pytest.mark.timeout(300)
def test_killed_prune_leaves_only_whole_entries(tmp_path: Path) -> None:
    """SIGKILL at points spread over a prune of many entries (timed first, CLI start-up included):
    every entry left is whole (its digest matches), list still works, and the next prune sweeps up."""
    _many(tmp_path / "timing")
    start = time.monotonic()
    subprocess.run(_prune_cmd(tmp_path / "timing"), cwd=REPO, check=True, capture_output=True, timeout=120)
    full = time.monotonic() - start
    for frac in (0.6, 0.75, 0.85, 0.92, 0.97):
        cache = tmp_path / f"c{frac}"
        _many(cache)
        proc = subprocess.Popen(_prune_cmd(cache), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * frac)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _entries_intact(cache)
        assert obelisk("image", "cache", "list", "--cache", cache, "--json", check=True).returncode == 0
        obelisk("image", "cache", "prune", "--cache", cache, "--max-size", "0", check=True)
        assert sorted(p.name for p in (cache / "stages" / "tree").iterdir()) == []


def test_choose_is_lru_and_never_takes_what_is_in_use(tmp_path: Path) -> None:
    listed = [stage_cache.Entry("tree", f"k{i}", tmp_path / f"k{i}", 10, float(i)) for i in range(5)]
    r = stage_cache.choose(listed, 25, in_use=[tmp_path / "k0"])
    assert [e.key for e in r.removed] == ["k1", "k2", "k3"]
    assert [e.key for e in r.kept_in_use] == ["k0"]
    assert r.after == 20
    assert stage_cache.choose(listed, 50).removed == []
    everything_in_use = stage_cache.choose(listed, 0, in_use=[e.path for e in listed])
    assert everything_in_use.removed == [] and everything_in_use.after == 50


@pytest.mark.parametrize(("text", "size"), [("10G", 10 * 1024**3), ("500M", 500 * MIB), ("1.5GiB", 3 * 1024**3 // 2),
                                            ("123", 123), ("0", 0), ("2 t", 2 * 1024**4), ("64kb", 65536),
                                            ("unlimited", None)])
def test_sizes(text: str, size: int | None) -> None:
    assert stage_cache.parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "-1", "5x", "G", "1e9", "10 GB extra", "١٠G", "nan", "0x10"])
def test_bad_sizes_are_one_line(bad: str, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not a size"):
        stage_cache.parse_size(bad)
    line = one_line_error(obelisk("image", "cache", "prune", "--cache", tmp_path, "--max-size", bad or " "))
    assert "--max-size" in line and "10G" in line
    line = one_line_error(obelisk("image", "build", "images/tiny.toml", "--cache", tmp_path, "--out", tmp_path,
                                  "--cache-max-size", bad or " "))
    assert "--cache-max-size" in line
    assert not (tmp_path / "stages").exists()  # refused before any work


def test_cache_commands_on_an_empty_or_missing_cache(tmp_path: Path) -> None:
    listed = json.loads(obelisk("image", "cache", "list", "--cache", tmp_path / "none", "--json", check=True).stdout)
    assert listed["entries"] == [] and listed["total"] == 0
    assert "0 entries" in obelisk("image", "cache", "list", "--cache", tmp_path / "none", check=True).stdout
    out = obelisk("image", "cache", "prune", "--cache", tmp_path / "none", "--max-size", "1G", check=True).stdout
    assert "removed 0 entries" in out
    line = one_line_error(obelisk("image", "cache", "prune", "--cache", tmp_path, "--max-size", "unlimited"))
    assert "nothing to prune" in line
