"""Fixtures for the update engine: real USR images (squashfs + dm-verity), signed payloads, a GPT disk
image file with USR-A holding the running release, the real `obelisk update serve`, and a scriptable
HTTP server on loopback for misbehaving-server cases (it records every Omaha event it is sent)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from testlib import stop_process

from bootloader import gpt, slots
from obelisk import signing
from obelisk.tools import run
from update_engine import omaha, payload

OBELISK = str(Path(sys.executable).with_name("obelisk"))


def need_tools(*tools: str) -> None:
    """Fail (not skip) when a system tool is missing: `make setup` installs them all."""
    missing = [t for t in tools if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
    if missing:
        pytest.fail(f"missing tools {missing}: run 'make setup'")


APPID = "{7a1c9d5e-0b7e-4c61-9a51-1f0e3c7d9b11}"
ARCH = "amd64"
CHUNK = 64 * 1024  # small chunks: many checkpoints in a small payload
MiB = 1 << 20
SLOT_SIZE = 6 * MiB
A_FIRST = 2048
B_FIRST = A_FIRST + SLOT_SIZE // 512
DISK_SIZE = (B_FIRST + SLOT_SIZE // 512 + 2048) * 512


def attrs(priority: int, tries: int, successful: bool) -> int:
    return (priority << 48) | (tries << 52) | (int(successful) << 56)


@dataclass
class Built:
    version: str
    usr: Path
    payload: Path
    root_hash: str
    hash_offset: int
    manifest: payload.Manifest


def make_usr(work: Path, version: str, seed: int) -> tuple[Path, str, int]:
    """A small USR image: gzip squashfs of ~1.5 MiB of incompressible files + dm-verity at hash_offset."""
    tree = work / f"tree-{version}"
    (tree / "share/obelisk").mkdir(parents=True)
    (tree / "share/obelisk/release").write_text(f"VERSION={version}\nAPPID={APPID}\nARCH={ARCH}\n")
    (tree / "lib").mkdir()
    (tree / "lib/blob").write_bytes(random.Random(seed).randbytes(1536 * 1024))
    img = work / f"usr-{version}.img"
    run(["mksquashfs", tree, img, "-comp", "gzip", "-noappend", "-all-root", "-no-progress", "-quiet",
         "-mkfs-time", "0", "-all-time", "0"])
    size = img.stat().st_size
    hash_offset = -(-size // 4096) * 4096
    with open(img, "r+b") as f:
        f.truncate(hash_offset)
    res = run(["veritysetup", "format", img, img, f"--hash-offset={hash_offset}",
               f"--data-blocks={hash_offset // 4096}", "--salt=" + "00" * 32,
               "--uuid=" + str(uuid.UUID(int=seed + 1))])
    root = next(ln.split(":", 1)[1].strip() for ln in res.stdout.splitlines() if ln.startswith("Root hash"))
    return img, root, hash_offset


@dataclass
class World:
    """Everything a test needs; built once per session, disks copied per test."""

    dir: Path
    priv: object
    pub: Path
    evil_priv: object
    evil_pub: Path
    builds: dict[str, Built] = field(default_factory=dict)
    template: Path | None = None

    def build(self, version: str, *, seed: int | None = None, key=None, app_id: str = APPID, arch: str = ARCH,
              name: str | None = None) -> Built:
        tag = name or version
        if tag in self.builds:
            return self.builds[tag]
        work = self.dir / "builds" / tag
        work.mkdir(parents=True)
        usr, root, hoff = make_usr(work, version, seed if seed is not None else abs(hash(version)) % 10_000)
        out = work / "update.payload"
        m = payload.write_payload(usr, out, app_id=app_id, arch=arch, version=version, verity_root_hash=root,
                                  hash_offset=hoff, private_key=key or self.priv, chunk_size=CHUNK)
        b = Built(version, usr, out, root, hoff, m)
        self.builds[tag] = b
        return b

    def publish(self, releases: Path, b: Built, *, name: str = "tiny", app_id: str = APPID) -> Path:
        d = releases / name / b.version
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(b.payload, d / "update.payload")
        data = (d / "update.payload").read_bytes()
        (d / "release.json").write_text(json.dumps({
            "name": name, "version": b.version, "build_id": "test", "app_id": app_id, "arch": ARCH,
            "verity_root_hash": b.root_hash, "hash_offset": b.hash_offset, "usr_size": b.usr.stat().st_size,
            "artifacts": {"update.payload": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))
        return d

    def disk(self, dest: Path) -> Path:
        assert self.template is not None
        shutil.copy(self.template, dest)
        return dest


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    need_tools("mksquashfs", "veritysetup")
    d = tmp_path_factory.mktemp("ue-world")
    signing.generate_keypair(d / "keys")
    signing.generate_keypair(d / "evil")
    w = World(d, signing.load_private_key(d / "keys/obelisk.key"), d / "keys/obelisk.pub",
              signing.load_private_key(d / "evil/obelisk.key"), d / "evil/obelisk.pub")
    base = w.build("1.0.0", seed=1)
    disk = d / "template.raw"
    gpt.create_table(disk, DISK_SIZE, [
        gpt.PartitionSpec(3, "USR-A", slots.USR_TYPE, slots.USR_A_UUID, A_FIRST, SLOT_SIZE // 512, attrs(1, 0, True)),
        gpt.PartitionSpec(4, "USR-B", slots.USR_TYPE, slots.USR_B_UUID, B_FIRST, SLOT_SIZE // 512, attrs(0, 0, False)),
    ], uuid.UUID("00000000-0000-0000-0000-000000000001"))
    with open(disk, "r+b") as f:
        f.seek(A_FIRST * 512)
        f.write(base.usr.read_bytes())
    w.template = disk
    return w


def slot_bytes(disk: Path, index: int) -> bytes:
    off, length = slots.slot_extent(disk, index)
    with open(disk, "rb") as f:
        f.seek(off)
        return f.read(length)


def slot_attrs(disk: Path) -> dict[str, tuple[int, int, bool]]:
    return {s.name: (s.priority, s.tries, s.successful) for s in slots.read_slots(disk)}


def veritysetup_verify(disk: Path, index: int, b: Built, tmp: Path) -> None:
    """dm-verity check of a slot's bytes, copied out to a file (no device-mapper on this host)."""
    copy = tmp / f"slot{index}.img"
    copy.write_bytes(slot_bytes(disk, index))
    run(["veritysetup", "verify", copy, copy, b.root_hash, f"--hash-offset={b.hash_offset}",
         f"--data-blocks={b.hash_offset // 4096}"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def obelisk_update_argv() -> list[str]:
    """`obelisk update` once the lead has mounted it, else the same typer app run as a module."""
    probe = subprocess.run([OBELISK, "update", "--help"], capture_output=True, text=True)
    if probe.returncode == 0:
        return [OBELISK, "update"]
    return [sys.executable, "-m", "update_engine.cli"]


@pytest.fixture(scope="session")
def ue_argv() -> list[str]:
    return obelisk_update_argv()


@dataclass
class Served:
    url: str
    proc: subprocess.Popen
    events_file: Path

    def events(self) -> list[dict]:
        r = requests.get(self.url + "/v1/events", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
        r.raise_for_status()
        return r.json()


ADMIN_TOKEN = "ue-test-admin-token-0123456789"  # GET /v1/events lists machine ids: the server wants a token


@pytest.fixture
def serve(ue_argv: list[str], tmp_path: Path):
    """Start the real `obelisk update serve` on a free loopback port; stopped by PID in the finalizer."""
    procs: list[subprocess.Popen] = []

    def start(releases: Path, *extra: str) -> Served:
        port = free_port()
        ev = tmp_path / f"events-{port}.jsonl"
        token = tmp_path / "admin.token"
        token.write_text(ADMIN_TOKEN + "\n")
        token.chmod(0o600)
        # The host engine's tests want the plain Omaha answers; the fleet's policy is tests/fleet's.
        state = [] if {"--state-dir", "--database"} & set(extra) else ["--no-state"]
        p = subprocess.Popen([*ue_argv, "serve", str(releases), "--listen", f"127.0.0.1:{port}", "--events", str(ev),
                              "--admin-token-file", str(token), *state, *extra], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        procs.append(p)
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                requests.get(url + "/health", timeout=1)
                return Served(url, p, ev)
            except requests.RequestException:
                if p.poll() is not None:
                    raise RuntimeError(f"serve exited: {p.stderr.read().decode()}") from None
                time.sleep(0.05)
        raise RuntimeError("serve did not come up")

    yield start
    for p in procs:
        stop_process(p)


# ---------------------------------------------------------------- a scriptable, misbehaving server


@dataclass
class Script:
    """How the fake update server behaves; every field can be changed between requests."""

    payload: bytes = b""
    version: str = "1.1.0"
    announce_size: int | None = None  # default: len(payload)
    announce_sha256: str | None = None  # default: sha256(payload)
    omaha_status: int = 200
    omaha_body: bytes | None = None  # raw response instead of the built one
    payload_status: int = 200
    stall_after: int | None = None  # bytes of payload sent before the server goes silent
    trickle: float = 0.0  # seconds to sleep per 16 KiB of payload
    truncate_to: int | None = None  # send only this many bytes but announce Content-Length of all
    noupdate: bool = False
    poll_interval: int | None = None


class FakeServer:
    """Omaha + payload on loopback (http.server): not obelisk's server, so it can misbehave on purpose."""

    def __init__(self) -> None:
        self.script = Script()
        self.events: list[omaha.Event] = []
        self.requests: list[omaha.Request] = []
        self.payload_gets: list[str | None] = []
        self.stop = threading.Event()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = omaha.parse_request(body)
                outer.requests.append(req)
                outer.events.extend(req.app.events)
                s = outer.script
                if not req.app.updatecheck:
                    return self._send(200, omaha.build_response(req.app.appid, updatecheck=None,
                                                                events=len(req.app.events)))
                if s.omaha_status != 200:
                    return self._send(s.omaha_status, b"server trouble")
                if s.omaha_body is not None:
                    return self._send(200, s.omaha_body)
                if s.noupdate:
                    return self._send(200, omaha.build_response(req.app.appid, poll_interval=s.poll_interval))
                upd = omaha.Update(s.version, [], "update.payload",
                                   s.announce_size if s.announce_size is not None else len(s.payload),
                                   s.announce_sha256 or hashlib.sha256(s.payload).hexdigest())
                host = f"http://127.0.0.1:{outer.port}/pkg"
                self._send(200, omaha.build_response(req.app.appid, update=upd, codebase=host,
                                                     poll_interval=s.poll_interval))

            def do_GET(self) -> None:  # noqa: N802
                s = outer.script
                outer.payload_gets.append(self.headers.get("Range"))
                if s.payload_status != 200:
                    return self._send(s.payload_status, b"no")
                data = s.payload
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                limit = len(body)
                if s.truncate_to is not None:
                    limit = max(0, min(limit, s.truncate_to - start))
                pos = 0
                try:
                    while pos < limit:
                        if s.stall_after is not None and start + pos >= s.stall_after:
                            outer.stop.wait(30)  # go silent; the client must time out
                            return
                        n = min(16384, limit - pos)
                        if s.stall_after is not None:
                            n = min(n, s.stall_after - start - pos) or n
                        self.wfile.write(body[pos:pos + n])
                        pos += n
                        if s.trickle:
                            time.sleep(s.trickle)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if limit < len(body):
                    self.close_connection = True

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/update/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    s = FakeServer()
    yield s
    s.close()


@dataclass
class Host:
    """Files a host would have: update.conf, release, keys, boot id, machine id, state dir."""

    root: Path
    disk: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    def set_version(self, version: str) -> None:
        (self.root / "release").write_text(f"VERSION={version}\nAPPID={APPID}\nARCH={ARCH}\n")

    def reboot(self) -> None:
        (self.root / "boot_id").write_text(str(uuid.uuid4()) + "\n")

    def argv(self, *extra: str) -> list[str]:
        return ["daemon", "--once", "--disk", str(self.disk), "--state-dir", str(self.state),
                "--conf", str(self.root / "update.conf"), "--usr-conf", str(self.root / "none.conf"),
                "--release", str(self.root / "release"), "--keys-dir", str(self.root / "keys"),
                "--lock-conf", str(self.root / "lock.conf"), "--health-dir", str(self.root / "health.d"),
                "--socket", str(self.root / "update.sock"), "--boot-id-file", str(self.root / "boot_id"),
                "--machine-id-file", str(self.root / "machine-id"), *extra]

    def options(self, **transfer):
        from update_engine.apply import Transfer
        from update_engine.daemon import Options
        t = Transfer(**{"low_speed_time": 2.0, "retries": 1, "retry_delay": 0.1, **transfer})
        r = self.root
        return Options(state_dir=self.state, conf=r / "update.conf", usr_conf=r / "none.conf", release=r / "release",
                       lock_conf=r / "lock.conf", keys_dir=r / "keys", disk=self.disk, health_dir=r / "health.d",
                       socket_path=r / "update.sock", boot_id_path=r / "boot_id", machine_id_path=r / "machine-id",
                       transfer=t, omaha_timeout=5.0)


@pytest.fixture
def host(world: World, tmp_path: Path):
    def make(server_url: str, *, version: str = "1.0.0") -> Host:
        root = tmp_path / f"host-{uuid.uuid4().hex[:6]}"
        (root / "keys").mkdir(parents=True)
        shutil.copy(world.pub, root / "keys/obelisk.pub")
        (root / "update.conf").write_text(f"SERVER={server_url}\nGROUP=stable\nREBOOT_STRATEGY=off\n")
        (root / "lock.conf").write_text("GROUP=default\n")
        (root / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
        h = Host(root, world.disk(root / "disk.raw"))
        h.set_version(version)
        h.reboot()
        return h
    return make


def run_ue(argv: list[str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "120"})


# ---------------------------------------------------------------- hostile servers and payloads


class RawServer:
    """A TCP server on 127.0.0.1 whose ``handler(conn, request_bytes, stop)`` writes whatever bytes it likes:
    drips, endless bodies, redirects, broken headers. http.server cannot send a header one byte at a time."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/update/"
        self.hits = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.hits += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    data += piece
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")
                               if ln.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    body += piece
                self.handler(conn, head + b"\r\n\r\n" + body, self.stop)
            except OSError:
                return  # the client gave up: what these servers are for

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture
def raw_server():
    made: list[RawServer] = []

    def start(handler) -> RawServer:
        s = RawServer(handler)
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def signed_payload(priv, out: Path, data: bytes, *, cuts: list[int] | None = None, chunk_size: int = CHUNK,
                   app_id: str = APPID, arch: str = ARCH, version: str = "1.1.0", root_hash: str = "ab" * 32,
                   hash_offset: int = 0, manifest_edit=None) -> Path:
    """A payload signed with ``priv`` whose replace operations cut ``data`` at ``cuts`` (positions, may repeat
    for zero-length operations); ``manifest_edit(obj)`` may change the JSON before it is signed. The
    writer never makes such payloads; a host must still handle whatever the format lets a key holder sign."""
    bounds = [0, *(cuts or []), len(data)]
    ops = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        piece = data[a:b]
        chunks = [hashlib.sha256(piece[i:i + chunk_size]).hexdigest() for i in range(0, len(piece), chunk_size)]
        ops.append({"type": "replace", "dst": {"offset": a, "length": b - a}, "data_offset": a,
                    "data_length": b - a, "chunk_sha256": chunks})
    obj = {"format": 1, "app_id": app_id, "arch": arch, "version": version,
           "target": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
           "verity": {"root_hash": root_hash, "hash_offset": hash_offset}, "block_size": 4096,
           "chunk_size": chunk_size, "operations": ops}
    if manifest_edit is not None:
        manifest_edit(obj)
    blob = payload.canonical_json(obj)
    head = payload.HEADER.pack(payload.MAGIC, payload.FORMAT_VERSION, len(blob), payload.SIGNATURE_SIZE, 0)
    out.write_bytes(head + blob + signing.sign(priv, head + blob) + data)
    return out
