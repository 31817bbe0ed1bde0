"""A FIFO (or socket, or folder) where `provision check` or `serve` expects a file never hangs them.

Reading a FIFO blocks until a writer comes; the server read its data files in the event loop, so
one FIFO named by a profile froze every request. Each case puts one in a copy of the example and
runs the real `obelisk provision check` and `serve` under a deadline: check names the file and
exits 2, serve answers a one-line 500 at once (and keeps serving other hosts), or refuses to start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prov_helpers import copy_example
from testlib import OBELISK

NODE1 = "52:54:00:12:34:56"
OTHER = "52:54:00:aa:bb:cc"


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _socket(path: Path) -> None:
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the socket file stays


def _folder(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


MAKERS: dict[str, Callable[[Path], None]] = {"FIFO": _fifo, "socket": _socket, "folder": _folder}
KIND_TEXT = {"FIFO": "is a FIFO", "socket": "is a socket", "folder": "is a directory"}
# (data file replaced, the endpoint a host of group node1 then fails on); the default group still works.
FILES = [("cloud/node1.yaml", "/cloud"), ("generic/node1.txt", "/generic"), ("profiles/p1.json", "/ipxe")]


def _data(tmp_path: Path) -> Path:
    """The example, with node1 on a profile and templates of its own (so the default group stays whole)."""
    d = copy_example(tmp_path / "data")
    (d / "cloud" / "node1.yaml").write_text((d / "cloud" / "node.yaml").read_text())
    (d / "generic" / "node1.txt").write_text((d / "generic" / "hosts.txt").read_text())
    p = json.loads((d / "profiles" / "tiny.json").read_text())
    p.update(id="p1", release=None, boot={"kernel": "/assets/k"}, cloud_id="node1.yaml", generic_id="node1.txt")
    (d / "profiles" / "p1.json").write_text(json.dumps(p))
    g = json.loads((d / "groups" / "node1.json").read_text())
    g["profile"] = "p1"
    (d / "groups" / "node1.json").write_text(json.dumps(g))
    return d


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", list(MAKERS))
def test_check_and_serve_name_a_data_file_that_is_not_a_file(tmp_path: Path, serve, kind: str) -> None:  # noqa: ANN001
    for rel, endpoint in FILES:
        d = _data(tmp_path / rel.replace("/", "_"))
        MAKERS[kind](d / rel)
        res = subprocess.run([OBELISK, "provision", "check", "--data", str(d)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 2, res.stdout + res.stderr
        if kind != "folder":  # a folder among templates is not a template; the missing reference is named
            assert f"error: {rel}: {KIND_TEXT[kind]}, not a data file" in res.stdout, res.stdout
        s = serve(d)
        r = requests.get(f"{s.url}{endpoint}?mac={NODE1}", timeout=10)
        assert r.status_code in (404, 500), (rel, r.status_code, r.text)
        assert r.text.count("\n") == 1 and r.text.startswith("error: "), r.text
        if r.status_code == 500:
            assert f"{rel}: {KIND_TEXT[kind]}" in r.text, r.text
        ok = requests.get(f"{s.url}/generic?mac={OTHER}", timeout=10)
        assert ok.status_code == 200 and ok.text.startswith("# worker host"), ok.text


@pytest.mark.timeout(120)
def test_a_pinned_release_json_that_is_a_fifo(tmp_path: Path, serve) -> None:  # noqa: ANN001
    d = copy_example(tmp_path / "data")
    assets = tmp_path / "assets"
    (assets / "tiny" / "0.1.0").mkdir(parents=True)
    os.mkfifo(assets / "tiny" / "0.1.0" / "release.json")
    p = json.loads((d / "profiles" / "tiny.json").read_text())
    p["release"] = "tiny/0.1.0"
    (d / "profiles" / "tiny.json").write_text(json.dumps(p))
    res = subprocess.run([OBELISK, "provision", "check", "--data", str(d), "--assets", str(assets)],
                         capture_output=True, text=True, timeout=60)
    assert "tiny/0.1.0/release.json cannot be read: is a FIFO" in res.stdout, res.stdout
    s = serve(d, "--assets", str(assets))
    r = requests.get(f"{s.url}/ipxe?mac={NODE1}", timeout=10)
    assert r.status_code == 404 and "release.json cannot be read: is a FIFO" in r.text, r.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("option", ["--write-token-file", "--tls-cert", "--tls-key"])
def test_serve_refuses_a_fifo_given_on_the_command_line(tmp_path: Path, option: str) -> None:
    d = copy_example(tmp_path / "data")
    fifo = tmp_path / "named.pipe"
    os.mkfifo(fifo)
    plain = tmp_path / "plain.pem"
    plain.write_text("")
    args = {"--write-token-file": [option, str(fifo)], "--tls-cert": [option, str(fifo), "--tls-key", str(plain)],
            "--tls-key": ["--tls-cert", str(plain), option, str(fifo)]}[option]
    res = subprocess.run([OBELISK, "provision", "serve", "--data", str(d), "--listen", "127.0.0.1:9", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is a FIFO" in lines[0], res.stderr
