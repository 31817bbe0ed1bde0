"""The rootfs key covers the Debian archive's state; --offline reuses the state recorded last.

A loopback HTTP server stands in for the mirror (the tests never reach deb.debian.org): it serves
``dists/<suite>/InRelease`` files written here in Debian's format.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from bhelpers import obelisk, one_line_error

from builder import apt_state, definition, pipeline
from builder.errors import BuildError
from builder.stages import rootfs

SUITE = "bookworm"


def release_text(amd64: str = "a" * 64, arm64: str = "b" * 64, translation: str = "c" * 64) -> str:
    return (f"Origin: Debian\nSuite: stable\nCodename: {SUITE}\nDate: Sat, 09 Nov 2024 10:00:00 UTC\n"
            "MD5Sum:\n 0123 1 main/binary-amd64/Packages\n"
            "SHA256:\n"
            f" {amd64} 8800000 main/binary-amd64/Packages.xz\n"
            f" {'d' * 64} 9000 main/binary-all/Packages.xz\n"
            f" {arm64} 8700000 main/binary-arm64/Packages.xz\n"
            f" {translation} 5000 main/i18n/Translation-en.xz\n"
            f" {'e' * 64} 7000 contrib/binary-amd64/Packages.xz\n")


def publish(root: Path, text: str, name: str = "InRelease", suite: str = SUITE) -> None:
    where = root / "debian" / "dists" / suite
    where.mkdir(parents=True, exist_ok=True)
    for old in ("InRelease", "Release"):
        (where / old).unlink(missing_ok=True)
    (where / name).write_text(text)


class Mirror:
    def __init__(self, root: Path) -> None:
        self.root = root
        handler = type("H", (http.server.SimpleHTTPRequestHandler,), {
            "log_message": lambda *_a: None,
            "__init__": lambda h, *a, **kw: http.server.SimpleHTTPRequestHandler.__init__(h, *a, directory=str(root),
                                                                                          **kw)})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/debian"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, text: str, name: str = "InRelease", suite: str = SUITE) -> None:
        publish(self.root, text, name, suite)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    m = Mirror(tmp_path / "www")
    m.publish(release_text())
    yield m
    m.close()


def dead_url() -> str:
    m = Mirror(Path("/nonexistent"))
    url = m.url
    m.close()  # nothing listens there now
    return url


def test_digest_covers_only_the_indices_the_build_reads() -> None:
    base = apt_state.indices_digest(release_text(), ("main",), "amd64")
    assert apt_state.indices_digest(release_text(amd64="f" * 64), ("main",), "amd64") != base
    # other architectures, translations and components the build does not use change nothing
    assert apt_state.indices_digest(release_text(arm64="f" * 64), ("main",), "amd64") == base
    assert apt_state.indices_digest(release_text(translation="f" * 64), ("main",), "amd64") == base
    assert apt_state.indices_digest(release_text(), ("main", "contrib"), "amd64") != base
    # an archive that lists none of them: the whole file counts
    odd = "Origin: odd\nSHA256:\n 00 1 other/Packages\n"
    assert apt_state.indices_digest(odd, ("main",), "amd64") != apt_state.indices_digest(odd + "X: y\n", ("main",),
                                                                                         "amd64")


def _ctx(tmp_path: Path, mirror_url: str, *, offline: bool = False, extra: str = "") -> pipeline.BuildContext:
    toml = tmp_path / "deb.toml"
    toml.write_text(f'name = "deb"\nversion = "1.0.0"\n[source]\nkind = "debian"\nsuite = "{SUITE}"\n'
                    f'mirror = "{mirror_url}"\npackages = ["python3"]\n{extra}')
    defn = definition.load(toml)
    return pipeline.BuildContext(definition=defn, definition_path=toml, version="1.0.0", build_id="x", epoch=0,
                                 formats=["raw"], private_key=None, trusted_keys=[],  # type: ignore[arg-type]
                                 cache=tmp_path / "cache", inputs_digest="0", offline=offline)


def test_rootfs_key_follows_the_archive(mirror: Mirror, tmp_path: Path) -> None:
    key = pipeline.stage_key(_ctx(tmp_path, mirror.url), rootfs)
    assert pipeline.stage_key(_ctx(tmp_path, mirror.url), rootfs) == key  # nothing changed: the cached rootfs
    mirror.publish(release_text(arm64="9" * 64))  # a change the build does not read
    assert pipeline.stage_key(_ctx(tmp_path, mirror.url), rootfs) == key
    mirror.publish(release_text(amd64="9" * 64))  # a new package version: a new rootfs
    newer = pipeline.stage_key(_ctx(tmp_path, mirror.url), rootfs)
    assert newer != key
    # Offline, with the mirror gone: the state seen last, so the rootfs built from it is reused.
    mirror.close()
    assert pipeline.stage_key(_ctx(tmp_path, mirror.url, offline=True), rootfs) == newer
    with pytest.raises(BuildError, match="pass --offline"):
        pipeline.stage_key(_ctx(tmp_path, mirror.url), rootfs)


def test_extra_sources_count_and_release_is_the_fallback(mirror: Mirror, tmp_path: Path) -> None:
    mirror.publish(release_text(), suite="bookworm-updates")
    extra = f'extra_sources = ["deb {mirror.url} bookworm-updates main"]\n'
    key = pipeline.stage_key(_ctx(tmp_path, mirror.url, extra=extra), rootfs)
    mirror.publish(release_text(amd64="7" * 64), name="Release", suite="bookworm-updates")  # no InRelease
    assert pipeline.stage_key(_ctx(tmp_path, mirror.url, extra=extra), rootfs) != key


def test_file_mirror(tmp_path: Path) -> None:
    root = tmp_path / "www"
    publish(root, release_text())
    url = f"file://{root}/debian"
    srcs = apt_state.sources(url, SUITE, ["main"], [])
    got = apt_state.state(srcs, "amd64", tmp_path / "cache", offline=False)
    assert got == {f"{url} {SUITE}": apt_state.indices_digest(release_text(), ("main",), "amd64")}


@pytest.mark.parametrize(("setup", "words"), [
    ("none", "has neither"),
    ("huge", "bigger than"),
    ("dead", "pass --offline"),
    ("offline-unrecorded", "build once with the network"),
])
def test_bad_archives_are_one_line(setup: str, words: str, mirror: Mirror, tmp_path: Path) -> None:
    url = mirror.url
    if setup == "none":
        mirror.publish("x", suite="other")
        url = url.replace("/debian", "/nothing")
    elif setup == "huge":
        mirror.publish("SHA256:\n" + " x" * (apt_state.MAX_RELEASE_BYTES // 2 + 10))
    elif setup == "dead":
        url = dead_url()
    srcs = apt_state.sources(url, SUITE, ["main"], [])
    with pytest.raises(BuildError, match=words):
        apt_state.state(srcs, "amd64", tmp_path / "cache", offline=setup.startswith("offline"))


def test_build_cli_says_what_to_do(tmp_path: Path) -> None:
    toml = tmp_path / "deb.toml"
    toml.write_text(f'name = "deb"\nversion = "1.0.0"\n[source]\nkind = "debian"\nmirror = "{dead_url()}"\n')
    args = ("image", "build", toml, "--cache", tmp_path / "cache", "--out", tmp_path / "out")
    assert "pass --offline" in one_line_error(obelisk(*args))
    line = one_line_error(obelisk(*args, "--offline"))
    assert "--offline" in line and "build once with the network" in line
    assert not (tmp_path / "out").exists()
