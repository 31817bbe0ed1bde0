"""Start the real `obelisk provision serve` (uvicorn) on a free loopback port, and a data folder to serve."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from ports import free_port
from testlib import OBELISK, REPO, stop_process

EXAMPLE = REPO / "examples" / "provision"


@dataclass
class Served:
    url: str
    proc: subprocess.Popen
    log: Path
    port: int

    def get(self, path: str, **kw) -> requests.Response:  # noqa: ANN003
        return requests.get(self.url + path, timeout=10, **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def copy_example(dest: Path) -> Path:
    """The example data folder without its assets link (tests give their own --assets)."""
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("assets"), symlinks=True)
    return dest


def start(data: Path, log: Path, *extra: str, scheme: str = "http", verify: object = True) -> Served:
    port = free_port()
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([OBELISK, "provision", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                             *extra], stdout=out, stderr=subprocess.STDOUT)
    out.close()
    url = f"{scheme}://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(url + "/health", timeout=1, verify=verify)
            return Served(url, proc, log, port)
        except requests.RequestException:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"serve exited {proc.returncode}: {tail}") from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("serve did not come up")


stop = stop_process
TOKEN = "test-write-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_token_file(folder: Path) -> Path:
    f = folder / "write.token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    return f


@contextmanager
def serving_rw(base: Path) -> Iterator[tuple[Served, Path]]:
    """A copy of the example data and a server on it with the write API open to TOKEN."""
    data = copy_example(base / "data")
    s = start(data, base / "serve.log", "--write-token-file", str(write_token_file(base)))
    try:
        yield s, data
    finally:
        stop(s.proc)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return copy_example(tmp_path / "data")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """serve(data, *extra_cli_args) -> Served; every server started is stopped by PID afterwards."""
    procs: list[subprocess.Popen] = []

    def _start(data: Path, *extra: str, **kw) -> Served:  # noqa: ANN003
        s = start(data, tmp_path / f"serve-{len(procs)}.log", *extra, **kw)
        procs.append(s.proc)
        return s

    yield _start
    for p in procs:
        stop(p)
