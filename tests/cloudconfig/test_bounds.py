"""Hostile sizes and special files (issue 19): endless HTTP bodies, gzip bombs, alias bombs, FIFOs.

Memory is measured, not guessed: the fetch or apply runs in a fresh interpreter that prints its own
peak RSS (VmHWM from /proc/self/status); it must stay under 100 MiB while being offered 1 GiB.
Bodies and bombs are generated on the fly (the server writes a zero buffer again and again; the
bomb is 1 GiB of zeros through zlib), never allocated whole.
"""

from __future__ import annotations

import ast
import base64
import gzip
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cloudconfig_helpers import tree_digest
from typer.testing import CliRunner

from cloudconfig import cli as cli_module
from cloudconfig.apply import InvalidConfig, apply_userdata
from cloudconfig.cli import app
from cloudconfig.datasources import DatasourceError, Settings, fetch
from cloudconfig.schema import duration, window_start
from cloudconfig.validate import MAX_FILE, MAX_FILES_TOTAL, MAX_USERDATA, validate_bytes
from obelisk.lock_conf import LockConfig

GiB = 1 << 30
MiB = 1 << 20
RSS_LIMIT_KIB = 100 * 1024
runner = CliRunner()
FIGURES: dict[str, int] = {}  # name -> peak RSS in KiB, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """One gzip member holding 1 GiB of zeros (about 1 MB), compressed chunk by chunk."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MiB)
    return b"".join([*(c.compress(zeros) for _ in range(1024)), c.flush()])


def _peak_rss(code: str, *args: str) -> tuple[int, str]:
    """Run ``code`` in a fresh interpreter; its peak RSS in KiB and its stdout."""
    tail = ("\nprint('HWM', next(ln.split()[1] for ln in open('/proc/self/status') "
            "if ln.startswith('VmHWM')))\n")
    # cwd "/": the package comes from the installed environment, not from whatever directory pytest runs in
    proc = subprocess.run([sys.executable, "-c", code + tail, *args], capture_output=True, text=True, timeout=120,
                          cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    hwm = int(proc.stdout.rsplit("HWM ", 1)[1].split()[0])
    return hwm, proc.stdout


def _record(name: str, kib: int) -> None:
    FIGURES[name] = kib
    print(f"\npeak RSS {name}: {kib / 1024:.1f} MiB")


BASELINE = """
import cloudconfig.datasources, cloudconfig.apply, cloudconfig.validate  # what every measured run imports
"""


@pytest.mark.timeout(60)
def test_baseline_rss_of_the_interpreter() -> None:
    kib, _ = _peak_rss(BASELINE)
    _record("baseline (imports only)", kib)
    assert kib < RSS_LIMIT_KIB


# --- 3. URL datasources stream the answer with a bound ------------------------------------------

class Endless(BaseHTTPRequestHandler):
    """1 GiB answers made on the fly, in several hostile shapes (by path)."""

    def log_message(self, *a: object) -> None:
        pass

    def _pour(self, total: int, chunked: bool = False, pause: float = 0.0) -> None:
        block = bytes(64 * 1024) if not pause else b"#"
        sent, deadline = 0, time.monotonic() + 60  # the server's own deadline, whatever the client does
        try:
            while sent < total and time.monotonic() < deadline:
                if chunked:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                else:
                    self.wfile.write(block)
                sent += len(block)
                if pause:
                    self.wfile.flush()
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: what we want

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming; IMDSv1 only
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    bomb = b""  # set by the fixture: a gzip answer that unpacks to 1 GiB

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        if self.path == "/declared":
            self.send_header("Content-Length", str(GiB))
        if self.path == "/gzip":
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(self.bomb)))
            self.end_headers()
            self.wfile.write(self.bomb)
            return
        self.end_headers()
        self._pour(GiB, pause=0.05 if self.path == "/trickle" else 0.0)

    def _small(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class EndlessChunked(Endless):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._pour(GiB, chunked=True)
        self.close_connection = True


@pytest.fixture
def endless(serve: Callable[[type[BaseHTTPRequestHandler]], str], bomb: bytes) -> Callable[..., str]:
    """Start an Endless server (or a subclass) with the bomb loaded."""
    def start(handler: type[Endless] = Endless) -> str:
        return serve(type("Served", (handler,), {"bomb": bomb}))

    return start


def _settings(tmp_path: Path, **kw: object) -> Settings:
    base: dict[str, object] = dict(cmdline=tmp_path / "cmdline", configdrive_dirs=(), nocloud_dirs=(),
                                   by_label=tmp_path / "none", ec2_endpoint="http://127.0.0.1:9", timeout=10.0,
                                   attempts=1)
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


FETCH = """
import sys
from pathlib import Path
from cloudconfig.datasources import DatasourceError, Settings, fetch
cmd = Path(sys.argv[1])
s = Settings(cmdline=cmd, configdrive_dirs=(), nocloud_dirs=(), by_label=cmd.parent / "none",
             ec2_endpoint=sys.argv[3], timeout=10.0, attempts=1)
try:
    fetch(s, sys.argv[2])
    print("FETCHED")
except DatasourceError as exc:
    print("ERROR", exc)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["close", "chunked", "gzip"])
def test_a_1gib_answer_is_cut_at_the_limit_in_little_memory(shape: str, endless, tmp_path: Path) -> None:
    """cloud-config-url offered 1 GiB (no length then close / chunked / a gzip bomb): one clear error,
    peak RSS of the fetching process under 100 MiB (it was 1.7 GB before)."""
    url = endless(EndlessChunked if shape == "chunked" else Endless) + f"/{shape}"
    cmd = tmp_path / "cmdline"
    cmd.write_text(f"console=ttyS0 cloud-config-url={url}\n")
    kib, out = _peak_rss(FETCH, str(cmd), "url", "http://127.0.0.1:9")
    _record(f"cloud-config-url, 1 GiB answer ({shape})", kib)
    assert f"ERROR {url}: the answer is larger than {MAX_USERDATA} bytes (the limit); nothing was applied" in out
    assert kib < RSS_LIMIT_KIB


@pytest.mark.timeout(120)
def test_ec2_userdata_of_1gib_is_cut_at_the_limit(tmp_path: Path, serve) -> None:
    class Imds(Endless):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/latest/meta-data/instance-id":
                return self._small(b"i-1")
            if self.path == "/latest/user-data":
                self.send_response(200)
                self.end_headers()
                return self._pour(GiB)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    url = serve(Imds)
    (tmp_path / "cmdline").write_text("quiet\n")
    kib, out = _peak_rss(FETCH, str(tmp_path / "cmdline"), "ec2", url)
    _record("ec2 user-data, 1 GiB answer", kib)
    assert f"ERROR {url}/latest/user-data: the answer is larger than {MAX_USERDATA} bytes" in out
    assert kib < RSS_LIMIT_KIB


@pytest.mark.timeout(60)
def test_an_endless_metadata_item_is_cut_at_one_mib(tmp_path: Path, serve) -> None:
    class Imds(Endless):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self._pour(GiB)

    url = serve(Imds)
    with pytest.raises(DatasourceError, match=r"instance-id: the answer is larger than 1048576 bytes"):
        fetch(_settings(tmp_path, ec2_endpoint=url), "ec2")


@pytest.mark.timeout(60)
def test_a_listing_of_50000_public_keys_is_refused(tmp_path: Path, serve) -> None:
    listing = "".join(f"{i}=k{i}\n" for i in range(50_000)).encode()

    class Imds(Endless):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/latest/meta-data/public-keys/":
                return self._small(listing)
            self._small(b"i-1" if self.path.endswith("instance-id") else b"x")

    with pytest.raises(DatasourceError, match="lists 50000 public keys; at most 100 are read"):
        fetch(_settings(tmp_path, ec2_endpoint=serve(Imds)), "ec2")


@pytest.mark.timeout(60)
def test_an_announced_1gib_answer_is_refused_before_reading(tmp_path: Path, endless) -> None:
    url = endless() + "/declared"
    (tmp_path / "cmdline").write_text(f"cloud-config-url={url}\n")
    t0 = time.monotonic()
    with pytest.raises(DatasourceError, match="the answer is larger than 16777216 bytes"):
        fetch(_settings(tmp_path), "url")
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(60)
def test_a_trickling_answer_hits_the_body_deadline(tmp_path: Path, endless) -> None:
    """One byte every 50 ms never trips the per-read timeout; the deadline for the whole answer does."""
    url = endless() + "/trickle"
    (tmp_path / "cmdline").write_text(f"cloud-config-url={url}\n")
    t0 = time.monotonic()
    with pytest.raises(DatasourceError, match=r"the answer took more than 1 s to arrive"):
        fetch(_settings(tmp_path, timeout=2.0, body_deadline=1.0), "url")
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("encoding", "body", "error"), [
    ("br", b"x", "encoded as 'br'; only gzip or none is read"),
    ("gzip", b"\x1f\x8b\x08\x00broken", "says gzip but does not decompress"),
])
def test_odd_content_encodings_are_one_clear_error(encoding: str, body: bytes, error: str, tmp_path: Path,
                                                   serve) -> None:
    class H(Endless):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    (tmp_path / "cmdline").write_text(f"cloud-config-url={serve(H)}/cc\n")
    with pytest.raises(DatasourceError, match=error):
        fetch(_settings(tmp_path), "url")


@pytest.mark.timeout(60)
def test_a_small_gzip_answer_is_unpacked(tmp_path: Path, serve) -> None:
    body = gzip.compress(b"#cloud-config\nhostname: gz\n")

    class H(Endless):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    (tmp_path / "cmdline").write_text(f"cloud-config-url={serve(H)}/cc\n")
    got = fetch(_settings(tmp_path), "url")
    assert got is not None and got.userdata == b"#cloud-config\nhostname: gz\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("token", [b"tok\r\nX-Injected: 1", b"", b"\xff\xfe", b"a b"])
def test_a_hostile_imds_token_is_refused(token: bytes, tmp_path: Path, serve) -> None:
    class H(Endless):
        def do_PUT(self) -> None:  # noqa: N802
            self._small(token)

    with pytest.raises(DatasourceError, match="the IMDSv2 token is not a printable ASCII word"):
        fetch(_settings(tmp_path, ec2_endpoint=serve(H)), "ec2")


# --- 4. gzip bombs: decompressed with an output bound -----------------------------------------

def _wf(content: str, encoding: str = "gzip+base64", n: int = 1) -> bytes:
    entries = "".join(f"  - path: /var/bomb{i}\n    encoding: {encoding}\n    content: {content}\n" for i in range(n))
    return f"#cloud-config\nhostname: h1\nwrite_files:\n{entries}".encode()


APPLY = """
import sys
from pathlib import Path
from cloudconfig.apply import InvalidConfig, apply_userdata
from cloudconfig.validate import validate_bytes
raw = Path(sys.argv[1]).read_bytes()
print("ERRORS", [e.text() for e in validate_bytes(raw).errors])
try:
    apply_userdata(raw, Path(sys.argv[2]))
    print("APPLIED")
except InvalidConfig as exc:
    print("REFUSED", exc)
"""


@pytest.mark.timeout(120)
def test_write_files_gzip_bomb_is_refused_at_validation_in_little_memory(bomb: bytes, root: Path,
                                                                        tmp_path: Path) -> None:
    """Issue 19: a 2.7 MB gzip+base64 entry passed validate, then apply wrote 2 GiB at 4.2 GB RSS."""
    raw = _wf(base64.b64encode(bomb).decode())
    cfg = tmp_path / "bomb.yaml"
    cfg.write_bytes(raw)
    digest = tree_digest(root)
    kib, out = _peak_rss(APPLY, str(cfg), str(root))
    _record(f"validate + apply, write_files gzip bomb ({len(raw) // 1024} KiB -> 1 GiB)", kib)
    assert (f"line 6: error: content cannot be decoded as gzip+base64: it exceeds {MAX_FILE} bytes when "
            "decompressed (the limit per file)") in out
    assert "REFUSED" in out and kib < RSS_LIMIT_KIB
    assert tree_digest(root) == digest


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", ["one member", "after a header member"])
def test_gzipped_userdata_bomb_is_refused_in_little_memory(shape: str, bomb: bytes, root: Path,
                                                          tmp_path: Path) -> None:
    """Issue 19: gzipped user-data reached 4.2 GB before its limit was checked."""
    raw = bomb if shape == "one member" else gzip.compress(b"#cloud-config\nhostname: h1\n") + bomb
    cfg = tmp_path / "bomb.gz"
    cfg.write_bytes(raw)
    digest = tree_digest(root)
    kib, out = _peak_rss(APPLY.replace("except InvalidConfig", "except Exception"), str(cfg), str(root))
    _record(f"validate + apply, gzipped user-data bomb ({shape})", kib)
    assert f"decompressed user-data exceeds {MAX_USERDATA} bytes" in out and "REFUSED" in out
    assert kib < RSS_LIMIT_KIB
    assert tree_digest(root) == digest


def test_small_multi_member_and_binary_gzip_still_decode(root: Path) -> None:
    two = base64.b64encode(gzip.compress(b"hello ") + gzip.compress(b"world")).decode()
    binary = base64.b64encode(gzip.compress(b"bin")).decode()
    raw = (f"#cloud-config\nwrite_files:\n  - path: /etc/two\n    encoding: gz+b64\n    content: {two}\n"
           f"  - path: /etc/bin\n    encoding: gzip\n    content: !!binary {binary}\n").encode()
    assert validate_bytes(raw).ok
    apply_userdata(raw, root)
    assert (root / "etc/two").read_bytes() == b"hello world" and (root / "etc/bin").read_bytes() == b"bin"


TEN_MIB = base64.b64encode(gzip.compress(bytes(10 * MiB))).decode()


@pytest.mark.parametrize(("raw", "line", "message"), [
    # gz (raw) content given as !!binary
    (None, 6, f"it exceeds {MAX_FILE} bytes when decompressed"),
    # two 10 MiB members in one entry: each under the limit, together over it
    (_wf(base64.b64encode(base64.b64decode(TEN_MIB) * 2).decode(), "gz+b64"), 6, f"it exceeds {MAX_FILE} bytes"),
    # seven 10 MiB files: each fine, together over the limit for all files (the 7th content is on line 24)
    (_wf(TEN_MIB, n=7), 24, f"write_files decode to more than {MAX_FILES_TOTAL} bytes by this entry"),
    # cut short, and garbage after the end of the stream
    (_wf(base64.b64encode(gzip.compress(bytes(1000))[:-20]).decode()), 6, "not gzip data"),
    (_wf(base64.b64encode(gzip.compress(b"x") + b"trailing").decode()), 6, "not gzip data"),
])
def test_compressed_content_past_the_limits_is_reported_with_its_line(raw: bytes | None, line: int, message: str,
                                                                      bomb: bytes, root: Path) -> None:
    if raw is None:
        raw = _wf("!!binary " + base64.b64encode(bomb).decode(), "gzip")
    errors = validate_bytes(raw).errors
    assert len(errors) == 1 and errors[0].line == line and message in errors[0].message, errors
    digest = tree_digest(root)
    with pytest.raises(InvalidConfig):
        apply_userdata(raw, root)
    assert tree_digest(root) == digest


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["users", "units", "write_files"])
def test_alias_bombs_stop_at_the_node_budget(where: str, root: Path) -> None:
    """A few hundred KB of `*alias` standing for 10^10 values (billion laughs): a clear error, quickly."""
    n = 20_000  # 20 000 users x 100 keys = 2 million values from about 100 KB of text
    keys = ", ".join(["ssh-ed25519 AAAAk"] * 100)
    if where == "users":
        doc = (f"x: &k [{keys}]\ny: &u {{name: bob, ssh_authorized_keys: *k}}\nusers: [{', '.join(['*u'] * n)}]\n")
    elif where == "units":
        doc = ("x: &d [{name: a.conf, content: x}, {name: b.conf, content: y}]\n"
               "y: &u {name: a.service, drop_ins: *d}\n"
               f"coreos:\n  units: [{', '.join(['*u'] * n)}]\n")
    else:  # the same 10 MiB compressed file a thousand times: the total limit stops the decoding
        doc = (f"x: &f {{path: /var/x, encoding: gzip+base64, content: {TEN_MIB}}}\n"
               f"write_files: [{', '.join(['*f'] * 1000)}]\n")
    raw = f"#cloud-config\n{doc}".encode()
    t0 = time.monotonic()
    errors = validate_bytes(raw).errors
    assert time.monotonic() - t0 < 20
    if where == "write_files":
        assert errors[-1].message.startswith(f"write_files decode to more than {MAX_FILES_TOTAL} bytes")
    else:
        assert errors[-1].message.startswith("the config expands to more than ")
        assert "values through YAML aliases" in errors[-1].message
    digest = tree_digest(root)
    with pytest.raises(InvalidConfig):
        apply_userdata(raw, root)
    assert tree_digest(root) == digest


def test_plain_aliases_still_work(root: Path) -> None:
    raw = (b"#cloud-config\nx: &keys [ssh-ed25519 AAAAk]\nssh_authorized_keys: *keys\n"
           b"users:\n  - name: bob\n    ssh-authorized-keys: *keys\n")
    rep = validate_bytes(raw)
    assert rep.ok and rep.value["users"][0]["ssh_authorized_keys"] == ["ssh-ed25519 AAAAk"]


# --- 6. FIFOs and other special files named as a config ------------------------------------------

def _special(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"cc-{kind}"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        p.mkdir()
    elif kind == "big":
        with p.open("wb") as f:
            f.truncate(MAX_USERDATA + 1)  # sparse: 16 MiB + 1 of zeros, no disk used
    elif kind == "chardev":
        return Path("/dev/zero")  # endless
    return p


SPECIAL_ERRORS = {
    "fifo": "{p}: is a FIFO, not a user-data file: give a regular file",
    "dir": "{p}: is a directory, not a user-data file: give a regular file",
    "chardev": "{p}: is a character device, not a user-data file: give a regular file",
    "big": "{p}: larger than 16777216 bytes (the limit for a user-data file)",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["validate", "apply"])
@pytest.mark.parametrize("kind", ["fifo", "dir", "chardev", "big"])
def test_a_special_file_given_as_the_config_is_one_clean_error(command: str, kind: str, tmp_path: Path,
                                                              root: Path) -> None:
    p = _special(tmp_path, kind)
    args = [command, str(p), *(["--root", str(root)] if command == "apply" else [])]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.stderr == f"error: {SPECIAL_ERRORS[kind].format(p=p)}\n"


@pytest.mark.timeout(30)
def test_too_much_on_standard_input_is_one_clean_error() -> None:
    res = runner.invoke(app, ["validate", "-"], input=b"#cloud-config\n" + bytes(MAX_USERDATA))
    assert res.exit_code == 2
    assert res.stderr == "error: standard input: more than 16777216 bytes (the user-data limit)\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("source", ["cmdline", "nocloud", "configdrive"])
def test_a_fifo_inside_a_datasource_is_one_clean_error(source: str, tmp_path: Path, root: Path) -> None:
    (tmp_path / "cmdline").write_text("quiet\n")
    args = ["apply", "--root", str(root), "--by-label", str(tmp_path / "none"), "--cmdline", str(tmp_path / "cmdline"),
            "--datasource", "url" if source == "cmdline" else source]
    if source == "cmdline":
        (tmp_path / "cmdline").unlink()
        os.mkfifo(tmp_path / "cmdline")
        fifo, what = tmp_path / "cmdline", "kernel command line"
    elif source == "nocloud":
        seed = tmp_path / "seed"
        seed.mkdir()
        (seed / "meta-data").write_text("instance-id: i\n")
        os.mkfifo(seed / "user-data")
        args += ["--nocloud", str(seed)]
        fifo, what = seed / "user-data", "user-data file"
    else:
        latest = tmp_path / "drive/openstack/latest"
        latest.mkdir(parents=True)
        os.mkfifo(latest / "meta_data.json")
        args += ["--configdrive", str(tmp_path / "drive")]
        fifo, what = latest / "meta_data.json", "meta_data.json"
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.stderr == f"error: {fifo}: is a FIFO, not a {what}: give a regular file\n"


# --- 7. a type error is reported on the key's line ------------------------------------------------

def test_type_errors_are_on_the_line_of_the_key() -> None:
    raw = (b"#cloud-config\nhostname:\n  - a\ncoreos:\n  units:\n    name: x.service\n  update:\n"
           b"    reboot-strategy:\n      - 'off'\nwrite_files:\n  - path: /etc/a\n    permissions:\n      [1]\n"
           b"users:\n  - name: bob\n    system:\n      maybe\n")
    rep = validate_bytes(raw)
    assert [(e.line, e.column, e.message) for e in rep.entries] == [
        (2, 1, 'incorrect type for "hostname" (want string)'),
        (5, 3, 'incorrect type for "units" (want list)'),
        (8, 5, 'incorrect type for "reboot_strategy" (want string)'),
        (12, 5, 'incorrect type for "permissions" (want string)'),
        (16, 5, "incorrect type for \"system\" (want bool (true/false), got 'maybe')"),
    ]


def test_a_key_that_is_a_lone_surrogate_prints() -> None:
    res = runner.invoke(app, ["validate", "-"], input=b'#cloud-config\n"\\ud800": 1\n')
    assert res.exit_code == 0 and res.stdout == 'line 2: warning: unrecognized key "\\ud800"\n'


# --- 9. one window parser, one error root -----------------------------------------------------------

@pytest.mark.parametrize("start", ["Thu 04:00", "3:30", "sun 23:59", "Mon..Fri 02:00", "Thursday 04:00",
                                   "Thursday 4am", "25:00", "Thu 04:00 1h", "", "04:60", "Funday 01:00"])
def test_window_start_agrees_with_lock_conf(start: str) -> None:
    ok = window_start(start) is None
    try:
        LockConfig.model_validate({"window_start": start, "window_length": "1h"}).windows()
        lock_ok = bool(start)
    except ValueError:
        lock_ok = False
    assert ok == lock_ok


@pytest.mark.parametrize("length", ["1h", "1h30m", "45s", "1.5h", "7d", "0s", "forever", "8d", "-1h", "10ns", ""])
def test_window_length_agrees_with_lock_conf(length: str) -> None:
    ok = duration(length) is None
    try:
        LockConfig.model_validate({"window_start": "Thu 04:00", "window_length": length}).windows()
        lock_ok = bool(length)
    except ValueError:
        lock_ok = False
    assert ok == lock_ok


def test_cli_catches_only_obelisk_errors() -> None:
    """Every except in cli.py names an ObeliskError subclass; a bug is a traceback, not a tidy line."""
    tree = ast.parse(Path(cli_module.__file__).read_text())
    caught = [ast.unparse(h.type) if h.type else "bare" for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler)]
    assert caught == ["(InvalidConfig, ignition.InvalidIgnition)"]


def test_a_bug_is_not_hidden_by_the_cli(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*_a: object, **_k: object) -> None:
        raise OSError("a bug, not bad input")

    monkeypatch.setattr(cli_module, "apply_userdata", bug)
    cfg = tmp_path / "cc"
    cfg.write_text("#cloud-config\n")
    res = runner.invoke(app, ["apply", str(cfg), "--root", str(root)])
    assert isinstance(res.exception, OSError)


def test_print_measured_figures() -> None:
    """Summary of this module's peak-RSS figures (visible with pytest -s)."""
    for name, kib in FIGURES.items():
        print(f"peak RSS {name}: {kib / 1024:.1f} MiB")
