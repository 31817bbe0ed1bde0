"""Hostile tarballs and OCI layouts: nothing outside the tree is deleted, emptied, written or read.

Every case keeps a canary folder with a secret *outside* the tree (next to it in tmp_path) and
shows that it survives untouched and that the secret never shows up inside the tree. The tests
run as root on the CI machine, so a regression would really delete or leak (the canary is a temp
folder, never a system path). The unpacker runs in-process; one case goes through the whole CLI.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from bhelpers import TINY, obelisk, one_line_error

from builder import archive
from builder.definition import OciSource
from builder.stages import rootfs

SECRET = b"-----BEGIN PRIVATE KEY----- canary secret\n"

Entry = tuple  # (name, kind, extra): kind file/dir/sym/hard/chr/fifo; extra = data, link target or mode


def _tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, *extra in entries:
            info = tarfile.TarInfo(name)
            data = b""
            if kind == "file":
                data = extra[0] if extra else b"x\n"
                info.mode = extra[1] if len(extra) > 1 else 0o644
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, extra[0] if extra else 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, extra[0]
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, extra[0]
            elif kind == "chr":
                info.type, info.devmajor, info.devminor, info.mode = tarfile.CHRTYPE, 8, 0, 0o666
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    c = tmp_path / "canary"
    (c / "sub").mkdir(parents=True)
    (c / "secret").write_bytes(SECRET)
    (c / "sub/file").write_text("keep me\n")
    return c


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(d.rglob("*"))}


def _secret_in(tree: Path) -> bool:
    return any(p.is_file() and not p.is_symlink() and SECRET in p.read_bytes() for p in tree.rglob("*"))


def _layers(tmp_path: Path, *layers: list[Entry]) -> list[Path]:
    paths = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i, entries in enumerate(layers):
        p = tmp_path / f"layer{i}.tar"
        p.write_bytes(_tar(entries))
        paths.append(p)
    return paths


def _unpack(tmp_path: Path, *layers: list[Entry], oci: bool = True) -> tuple[Path, list[str]]:
    root = tmp_path / "root"
    root.mkdir(parents=True)
    warnings: list[str] = []
    archive.unpack(_layers(tmp_path, *layers), root, oci=oci, warn=warnings.append)
    return root, warnings


# --- whiteouts ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_opaque_whiteout_below_a_symlink_to_outside_is_refused(tmp_path: Path, canary: Path) -> None:
    """`x -> /` then `x/.wh..wh..opq` would empty the build host's / (here: the canary)."""
    before = _snapshot(canary)
    with pytest.raises(archive.ArchiveError, match=r"entry 'x/\.wh\.\.wh\.\.opq': x is a symlink"):
        _unpack(tmp_path, [("x", "sym", str(canary))], [("x/.wh..wh..opq", "file")])
    assert _snapshot(canary) == before


@pytest.mark.timeout(30)
def test_whiteout_below_a_symlink_an_earlier_layer_made_is_refused(tmp_path: Path, canary: Path) -> None:
    before = _snapshot(canary)
    with pytest.raises(archive.ArchiveError, match="etc/x is a symlink"):
        _unpack(tmp_path, [("etc", "dir"), ("etc/x", "sym", str(canary))], [("etc/x/.wh.secret", "file")])
    assert _snapshot(canary) == before


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["../canary/.wh.secret", "etc/../../canary/.wh.secret", "/canary/.wh.secret",
                                  "etc/.wh..."])
def test_whiteout_names_leaving_the_tree_are_refused(tmp_path: Path, canary: Path, name: str) -> None:
    before = _snapshot(canary)
    with pytest.raises(archive.ArchiveError, match="absolute path|'\\.\\.' component|names no file"):
        _unpack(tmp_path, [("etc", "dir")], [(name, "file")])
    assert _snapshot(canary) == before


@pytest.mark.timeout(30)
def test_whiteouts_remove_links_not_what_they_point_at(tmp_path: Path, canary: Path) -> None:
    """Inside-tree semantics: a whiteout of a symlink, of a folder holding one, and an opaque folder holding
    one remove the links; the canary they point at stays."""
    before = _snapshot(canary)
    root, _ = _unpack(tmp_path,
                      [("a", "sym", str(canary)), ("d", "dir"), ("d/l", "sym", str(canary)), ("o", "dir"),
                       ("o/l", "sym", str(canary)), ("o/f", "file")],
                      [(".wh.a", "file"), (".wh.d", "file"), ("o/.wh..wh..opq", "file"), ("o/new", "file")])
    assert not os.path.lexists(root / "a") and not os.path.lexists(root / "d")
    assert sorted(os.listdir(root / "o")) == ["new"]  # the same layer's entries stay
    assert _snapshot(canary) == before


@pytest.mark.timeout(30)
def test_whiteout_of_something_absent_does_nothing(tmp_path: Path) -> None:
    root, _ = _unpack(tmp_path, [("etc", "dir"), ("etc/hostname", "file")],
                      [("etc/.wh.missing", "file"), ("var/.wh..wh..opq", "file")])
    assert (root / "etc/hostname").is_file()


# --- writes and hard links ------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("oci", [False, True])
@pytest.mark.parametrize("link", ["{canary}/secret", "../canary/secret", "etc/../../canary/secret", "lnk/secret"])
def test_hard_link_to_a_host_file_is_refused(tmp_path: Path, canary: Path, oci: bool, link: str) -> None:
    """The attack that put the signing key into usr.img: a hard link entry naming a host file."""
    entries: list[Entry] = [("lnk", "sym", str(canary)), ("etc", "dir"),
                            ("etc/key", "hard", link.format(canary=canary))]
    root = tmp_path / "root"
    with pytest.raises(archive.ArchiveError, match="absolute path|'\\.\\.' component|lnk is a symlink"):
        _unpack(tmp_path, entries, oci=oci)
    assert not _secret_in(root)
    assert (canary / "secret").read_bytes() == SECRET and os.stat(canary / "secret").st_nlink == 1


@pytest.mark.timeout(30)
def test_hard_link_to_a_symlink_links_the_symlink_not_its_target(tmp_path: Path, canary: Path) -> None:
    root, _ = _unpack(tmp_path, [("s", "sym", f"{canary}/secret"), ("k", "hard", "s")], oci=False)
    assert (root / "k").is_symlink() and os.readlink(root / "k") == f"{canary}/secret"
    assert not _secret_in(root) and os.stat(canary / "secret").st_nlink == 1


@pytest.mark.timeout(30)
def test_hard_link_inside_the_tree_works(tmp_path: Path) -> None:
    root, _ = _unpack(tmp_path, [("usr/bin/a", "file", b"A\n", 0o755), ("usr/bin/b", "hard", "usr/bin/a")],
                      oci=False)
    assert os.stat(root / "usr/bin/a").st_ino == os.stat(root / "usr/bin/b").st_ino
    with pytest.raises(archive.ArchiveError, match="not a file in the tree"):
        _unpack(tmp_path / "x", [("b", "hard", "missing")], oci=False)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("oci", [False, True])
def test_nothing_is_written_through_a_symlink(tmp_path: Path, canary: Path, oci: bool) -> None:
    before = _snapshot(canary)
    with pytest.raises(archive.ArchiveError, match="etc/x is a symlink: refusing to write through it"):
        _unpack(tmp_path, [("etc/x", "sym", str(canary)), ("etc/x/evil", "file", b"pwned\n")], oci=oci)
    assert _snapshot(canary) == before
    # The same in a later layer, and a folder entry through the link.
    for i, second in enumerate(([("etc/x/evil", "file")], [("etc/x/sub/", "dir")])):
        with pytest.raises(archive.ArchiveError, match="etc/x is a symlink"):
            _unpack(tmp_path / f"l{i}", [("etc/x", "sym", str(canary))], second)
    assert _snapshot(canary) == before


@pytest.mark.timeout(30)
def test_a_file_replaces_a_symlink_instead_of_writing_to_its_target(tmp_path: Path, canary: Path) -> None:
    root, _ = _unpack(tmp_path, [("etc/passwd", "sym", f"{canary}/secret")], [("etc/passwd", "file", b"mine\n")])
    assert not (root / "etc/passwd").is_symlink() and (root / "etc/passwd").read_bytes() == b"mine\n"
    assert (canary / "secret").read_bytes() == SECRET


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["/abs/evil", "../evil", "a/../../evil", "a/b/../../../evil"])
def test_names_leaving_the_tree_are_refused_before_anything_is_written(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    with pytest.raises(archive.ArchiveError, match="absolute path|'\\.\\.' component"):
        _unpack(tmp_path, [("first", "file"), (name, "file", b"pwned\n")], oci=False)
    assert not (root / "first").exists() and not (tmp_path / "evil").exists()


# --- modes, devices -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_setuid_setgid_and_sticky_bits_are_kept(tmp_path: Path) -> None:
    root, _ = _unpack(tmp_path, [("usr/bin/su", "file", b"su\n", 0o4755), ("usr/bin/wall", "file", b"w\n", 0o2755),
                                 ("tmp", "dir", 0o1777), ("var/mail", "dir", 0o2775), ("ro", "dir", 0o555),
                                 ("ro/inside", "file")], oci=False)
    assert stat.S_IMODE(os.stat(root / "usr/bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(root / "usr/bin/wall").st_mode) == 0o2755
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(root / "var/mail").st_mode) == 0o2775
    assert stat.S_IMODE(os.stat(root / "ro").st_mode) == 0o555 and (root / "ro/inside").is_file()


@pytest.mark.timeout(30)
def test_device_nodes_and_fifos_are_skipped_with_a_warning(tmp_path: Path) -> None:
    root, warnings = _unpack(tmp_path, [("dev", "dir"), ("dev/sda", "chr"), ("run/initctl", "fifo"),
                                        ("etc/motd", "file")], oci=False)
    assert not os.path.lexists(root / "dev/sda") and not os.path.lexists(root / "run/initctl")
    assert (root / "etc/motd").is_file()
    assert len(warnings) == 1 and "skipped 2 device node(s), FIFO(s)" in warnings[0] and "dev/sda" in warnings[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("entries", "what"), [
    ([("usr", "sym", "/")], "/usr is a symlink"),
    ([("usr/lib", "sym", "/tmp")], "/usr/lib is a symlink"),
    ([("etc", "sym", "/etc")], "/etc is a symlink"),
    ([("usr/lib/modules/6.1.0", "sym", "/lib/modules/6.1.0")], "/usr/lib/modules/6.1.0 is not a directory"),
    ([("usr/share", "file")], "/usr/share is not a directory"),
])
def test_system_folders_that_are_symlinks_are_refused(tmp_path: Path, entries: list[Entry], what: str) -> None:
    """Later steps (kernel install, overlays, mksquashfs of /usr) write into or read from these folders."""
    root, _ = _unpack(tmp_path, entries, oci=False)
    with pytest.raises(archive.ArchiveError, match=what):
        rootfs.check_layout(root)


# --- OCI layouts --------------------------------------------------------------------------------


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _layout(layout: Path, layers: list[bytes], *, manifest_desc=None, layer_descs=None) -> OciSource:
    descs = layer_descs or [_blob(layout, data) for data in layers]
    config = _blob(layout, json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    manifest = manifest_desc or _blob(layout, json.dumps({"schemaVersion": 2, "config": config,
                                                          "layers": descs}).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
    return OciSource(kind="oci", path=layout)


@pytest.mark.timeout(30)
def test_a_layer_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    src = _layout(layout, [_tar([("etc/motd", "file", b"good\n")])])
    good = rootfs.oci_layers(src)
    assert len(good) == 1
    good[0].write_bytes(_tar([("etc/motd", "file", b"swap\n")]))  # same name, other bytes
    with pytest.raises(archive.ArchiveError, match="layer 1 blob .* does not match its digest"):
        rootfs.oci_layers(src)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("digest", ["sha256:../../../outside/manifest", "sha256:" + "A" * 64, "md5:" + "0" * 32,
                                    "sha256:" + "0" * 63, "sha256:" + "0" * 64 + "\n", "sha256", 7, None])
def test_digests_that_are_not_algorithm_hex_are_refused(tmp_path: Path, digest: object) -> None:
    """A '../' digest read a manifest from outside the layout."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest").write_text(json.dumps({"layers": []}))
    layout = tmp_path / "oci"
    src = _layout(layout, [], manifest_desc={"digest": digest, "size": 10})
    with pytest.raises(archive.ArchiveError, match="has digest .*: expected sha256: and 64 hex digits"):
        rootfs.oci_layers(src)
    src = _layout(tmp_path / "oci2", [], layer_descs=[{"digest": digest}])
    with pytest.raises(archive.ArchiveError, match="layer 1 has digest"):
        rootfs.oci_layers(src)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("index", "expect"), [
    ('{"manifests": "x"}', "manifests is not a JSON list"),
    ("[1, 2]", "index.json is not a JSON dict"),
    ("{not json", "index.json is not valid JSON"),
    ('{"manifests": [{"digest": "sha256:' + "0" * 64 + '"}]}', "no such blob file"),
])
def test_malformed_layouts_say_what_is_wrong(tmp_path: Path, index: str, expect: str) -> None:
    layout = tmp_path / "oci"
    layout.mkdir()
    (layout / "index.json").write_text(index)
    with pytest.raises(archive.ArchiveError, match=expect):
        rootfs.oci_layers(OciSource(kind="oci", path=layout))


@pytest.mark.timeout(30)
def test_size_mismatch_and_fifo_blobs_are_refused(tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    data = _tar([("etc/motd", "file")])
    desc = {**_blob(layout, data), "size": len(data) + 1}
    with pytest.raises(archive.ArchiveError, match="descriptor says"):
        rootfs.oci_layers(_layout(layout, [], layer_descs=[desc]))
    fifo_layout = tmp_path / "fifo"
    fifo_layout.mkdir()
    os.mkfifo(fifo_layout / "index.json")
    with pytest.raises(archive.ArchiveError, match="is a FIFO"):
        rootfs.oci_layers(OciSource(kind="oci", path=fifo_layout))


@pytest.mark.timeout(600)
def test_hostile_oci_build_is_refused_through_the_cli(tmp_path: Path, canary: Path, shared_cache: Path) -> None:
    """The whole command: one error line, exit 2, nothing published, the canary (outside) untouched."""
    layout = tmp_path / "oci"
    src = _layout(layout, [_tar([("x", "sym", str(canary))]), _tar([("x/.wh..wh..opq", "file")])])
    defn = tmp_path / "tiny.toml"
    defn.write_text(TINY.replace('kind = "tiny"', f'kind = "oci"\npath = "{src.path}"'))
    before = _snapshot(canary)
    proc = obelisk("image", "build", defn, "--out", tmp_path / "out", "--cache", shared_cache)
    line = one_line_error(proc)
    assert "x is a symlink: refusing to write through it" in line, line
    assert _snapshot(canary) == before
    assert not (tmp_path / "out/tiny").exists()
