"""The pipeline: stage order from DEPENDS, code digests from the import scan, damaged cache entries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bhelpers import EPOCH, REPO, Built

from builder import imports, pipeline

# --- order -----------------------------------------------------------------------------------------


def test_stages_run_in_an_order_derived_from_their_depends() -> None:
    order = pipeline.pipeline_stages()
    assert sorted(order) == pipeline.stage_names()
    for i, name in enumerate(order):
        for dep in pipeline.stage_module(name).DEPENDS:
            assert order.index(dep) < i, f"{name} runs before its dependency {dep}"
    assert order == ["rootfs", "python", "tree", "usr", "esp", "fs", "disk", "payload", "formats", "release"]


@pytest.mark.parametrize(("graph", "expect"), [
    ({"a": ("b",), "b": ("a",)}, "stage dependencies form a cycle: a -> b -> a"),
    ({"a": (), "b": ("a", "c"), "c": ("b",)}, "cycle: b -> c -> b"),
    ({"z": (), "a": ("b",), "b": ("c",), "c": ("a",), "sink": ("z",)}, "cycle: a -> b -> c -> a"),  # not below a sink
    ({"a": ("a",)}, "cycle: a -> a"),
    ({"a": ("nope",)}, "stage a depends on 'nope', which is not a stage (stages: a)"),
])
def test_cycles_and_unknown_dependencies_are_errors(graph: dict, expect: str) -> None:
    with pytest.raises(pipeline.StageGraphError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        pipeline.stage_order(graph)


def test_order_is_deterministic_and_follows_declarations() -> None:
    graph = {"d": ("b", "c"), "c": ("a",), "b": ("a",), "a": (), "e": ()}
    assert pipeline.stage_order(graph) == ["a", "b", "c", "d", "e"]
    assert pipeline.stage_order({"d": ("c", "b"), "c": ("a",), "b": ("a",), "a": (), "e": ()}) == \
        ["a", "c", "b", "d", "e"]


# --- import scan -----------------------------------------------------------------------------------


def test_import_scan_follows_lazy_relative_and_from_imports(tmp_path: Path) -> None:
    def write(rel: str, text: str = "") -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)

    write("builder/__init__.py")
    write("builder/stages/__init__.py")
    write("builder/stages/s.py", "from builder import helper\nfrom . import sibling\n")
    write("builder/stages/sibling.py", "def f():\n    import bootloader.deep  # lazy\n")
    write("builder/helper.py", "from ..obelisk import nothing\nimport os\nfrom obelisk.tools import run\n")
    write("builder/unused.py")
    write("bootloader/__init__.py")
    write("bootloader/deep.py")
    write("bootloader/initramfs/init", "#!/bin/sh\n")
    write("obelisk/__init__.py")
    write("obelisk/tools.py")
    found = imports.closure(["builder.stages.s"], tmp_path)
    assert sorted(found) == ["bootloader", "bootloader.deep", "builder", "builder.helper", "builder.stages",
                             "builder.stages.s", "builder.stages.sibling", "obelisk", "obelisk.tools"]
    files = {p.relative_to(tmp_path).as_posix() for p in imports.files(["builder.stages.s"], tmp_path)}
    assert "bootloader/initramfs/init" in files and "builder/unused.py" not in files


# --- cache entries ---------------------------------------------------------------------------------


def _tiny(tiny: Built, out: Path, cache: Path | None = None) -> tuple[dict, str]:
    proc = subprocess.run([str(Path(sys.executable).with_name("obelisk")), "image", "build", "images/tiny.toml",
                           "--out", str(out), "--cache", str(cache or tiny.cache), "--key", str(tiny.key),
                           "--format", "raw,qcow2,pxe", "--json"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "COLUMNS": "200"}, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


@pytest.mark.timeout(900)
def test_a_damaged_cache_entry_is_rebuilt_not_published(tiny: Built, tmp_path: Path) -> None:
    ref, _ = _tiny(tiny, tmp_path / "ref")  # up to date with the checkout
    good = (Path(ref["release_dir"]) / "usr.img").read_bytes()
    entry = tiny.cache / "stages/usr" / ref["stages"]["usr"]["key"]
    with (entry / "usr.img").open("r+b") as f:  # one flipped bit in /usr's squashfs
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 1]))
    release_entry = tiny.cache / "stages/release" / ref["stages"]["release"]["key"]
    (release_entry / "meta.json").write_text("{not json")
    formats_entry = tiny.cache / "stages/formats" / ref["stages"]["formats"]["key"]
    (formats_entry / pipeline.ENTRY_DIGEST).unlink()
    res, err = _tiny(tiny, tmp_path / "out")
    rebuilt = sorted(n for n, s in res["stages"].items() if not s["cached"])
    assert rebuilt == ["formats", "release", "usr"], res["stages"]
    assert f"stage usr: cache entry {entry} is damaged (its files do not match the digest" in err.replace("\n", " ")
    assert "stage release: cache entry" in err and "its meta.json is not valid JSON" in err
    assert "stage formats: cache entry" in err and "it has no digest" in err
    assert (Path(res["release_dir"]) / "usr.img").read_bytes() == good
    again, err = _tiny(tiny, tmp_path / "again")
    assert again["all_cached"] and "damaged" not in err


# --- code digests ----------------------------------------------------------------------------------


def _copy_checkout(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", ".venv", "out", "*.egg-info", "tests", "bench",
                                    "docs", "examples")
    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    return dest


def _build_in(copy: Path, tiny: Built, out: Path) -> dict:
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PYTHONPATH": str(copy), "COLUMNS": "200"}
    argv = [sys.executable, "-c", "import sys; from obelisk.cli import main; sys.argv[0] = 'obelisk'; main()",
            "image", "build", "images/tiny.toml", "--out", str(out), "--cache", str(tiny.cache), "--key",
            str(tiny.key), "--format", "raw,qcow2,pxe", "--json"]
    proc = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _rebuilt(res: dict) -> list[str]:
    return sorted(n for n, s in res["stages"].items() if not s["cached"])


def _dependents(changed: set[str]) -> set[str]:
    """Stages whose code includes a changed file, and every stage that depends on those."""
    order = pipeline.pipeline_stages()
    out: set[str] = set()
    for name in order:
        mod = pipeline.stage_module(name)
        code = {p.relative_to(REPO).as_posix() for p in imports.files([mod.__name__, pipeline.__name__])}
        if code & changed or out & set(mod.DEPENDS):
            out.add(name)
    return out


@pytest.mark.timeout(1800)
def test_editing_a_module_a_stage_imports_indirectly_rebuilds_that_stage(tiny: Built, tmp_path: Path) -> None:
    """A copy of the checkout built against the shared cache; then a comment appended to a module that the
    disk stage reaches only through bootloader.gpt (bootloader/layout.py), and to builder/ext4.py (which the
    old hand-written CODE lists missed): exactly the stages that import them, and what depends on those, rerun."""
    copy = _copy_checkout(tmp_path / "checkout")
    where = subprocess.run([sys.executable, "-c", "import builder, bootloader; print(builder.__file__, "
                            "bootloader.__file__)"], env={**os.environ, "PYTHONPATH": str(copy)}, cwd=copy,
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(w.startswith(str(copy)) for w in where), where  # the copy's code runs, not the checkout's
    _build_in(copy, tiny, tmp_path / "o0")  # brings the shared cache up to date with the copy
    assert _build_in(copy, tiny, tmp_path / "o1")["all_cached"]
    for n, rel in enumerate(("bootloader/layout.py", "builder/ext4.py"), start=2):
        with (copy / rel).open("a") as f:
            f.write("# edited by test_pipeline: this changes the code digest of every stage that imports it\n")
        res = _build_in(copy, tiny, tmp_path / f"o{n}")
        expect = _dependents({rel})
        assert set(_rebuilt(res)) == expect, (rel, res["stages"])
        assert "rootfs" not in expect and "python" not in expect
        if rel == "bootloader/layout.py":
            assert {"esp", "disk"} <= expect  # neither stage imports bootloader.layout itself
            assert "bootloader.layout" not in imports._imports(
                REPO / "builder/stages/disk.py", "builder.stages.disk", 0)
        else:
            assert expect == {"fs", "disk", "formats", "release"}
