"""Bad input, each refused with a clear error and an Omaha error event; the running slot's bytes and
every slot's attributes stay as they were and the passive slot is never made bootable.

The server here is a scriptable http.server on loopback (ue_helpers.FakeServer), not obelisk's own,
because it must misbehave on purpose (stall, truncate, lie about sizes, answer 5xx)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from ue_helpers import APPID, CHUNK, World, run_ue, slot_attrs, slot_bytes

from update_engine import omaha, payload
from update_engine.daemon import INTERVAL, Daemon, next_interval


def _variant(world: World, tmp: Path, **kw) -> bytes:
    b = world.build("1.1.0", seed=2)
    args = {"app_id": APPID, "arch": "amd64", "version": "1.1.0", "verity_root_hash": b.root_hash,
            "hash_offset": b.hash_offset, "private_key": world.priv, "chunk_size": CHUNK, **kw}
    out = tmp / "variant.payload"
    payload.write_payload(b.usr, out, **args)
    return out.read_bytes()


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x04
    return bytes(b)


CASES = {
    # name: (script changes (a function of world, tmp, good payload), expected error code, words in the error)
    "truncated payload": (lambda w, t, p: {"truncate_to": len(p) - 5000}, omaha.ERR_DOWNLOAD_TRANSFER, "download"),
    "flipped bit in data": (lambda w, t, p: {"payload": _flip(p, len(p) - 3000)}, omaha.ERR_PAYLOAD_HASH,
                            "signed hash"),
    "flipped bit in manifest": (lambda w, t, p: {"payload": _flip(p, 60)}, omaha.ERR_SIGNATURE, "signature"),
    "untrusted key": (lambda w, t, p: {"payload": _variant(w, t, private_key=w.evil_priv)}, omaha.ERR_SIGNATURE,
                      "trusted key"),
    "other app id": (lambda w, t, p: {"payload": _variant(w, t, app_id="{00000000-1111-2222-3333-444444444444}")},
                     omaha.ERR_PAYLOAD_VERIFICATION, "app"),
    "other arch": (lambda w, t, p: {"payload": _variant(w, t, arch="arm64")}, omaha.ERR_PAYLOAD_VERIFICATION,
                   "arch"),
    "older version": (lambda w, t, p: {"payload": _variant(w, t, version="0.9.0"), "version": "0.9.0"},
                      omaha.ERR_PAYLOAD_VERIFICATION, "not newer"),
    "equal version": (lambda w, t, p: {"payload": _variant(w, t, version="1.0.0"), "version": "1.0.0"},
                      omaha.ERR_PAYLOAD_VERIFICATION, "not newer"),
    "server sends more than announced": (lambda w, t, p: {"payload": p + b"\0" * 300_000,
                                                          "announce_size": len(p),
                                                          "announce_sha256": hashlib.sha256(p).hexdigest()},
                                         omaha.ERR_PAYLOAD_SIZE, "more than"),
    "announced size differs from manifest": (lambda w, t, p: {"announce_size": len(p) - 4096},
                                             omaha.ERR_PAYLOAD_SIZE, "announced"),
    "hash differs from Omaha's": (lambda w, t, p: {"announce_sha256": "00" * 32}, omaha.ERR_PAYLOAD_HASH,
                                  "SHA-256"),
    "stalling server": (lambda w, t, p: {"stall_after": 200_000}, omaha.ERR_DOWNLOAD_TRANSFER, "stopped sending"),
    "malformed Omaha XML": (lambda w, t, p: {"omaha_body": b"<response><app status='ok'><updatecheck"},
                            omaha.ERR_OMAHA_INVALID, "XML"),
    "Omaha without postinstall action": (
        lambda w, t, p: {"omaha_body": omaha.build_response(APPID, update=omaha.Update(
            "1.1.0", [], "update.payload", len(p), hashlib.sha256(p).hexdigest()), codebase="http://x").replace(
            b'event="postinstall"', b'event="other"')}, omaha.ERR_OMAHA_INVALID, "postinstall"),
    "Omaha HTTP 503": (lambda w, t, p: {"omaha_status": 503}, omaha.ERR_OMAHA_HTTP_BASE + 503, "HTTP 503"),
    "Omaha HTTP 404": (lambda w, t, p: {"omaha_status": 404}, omaha.ERR_OMAHA_HTTP_BASE + 404, "HTTP 404"),
    "payload HTTP 404": (lambda w, t, p: {"payload_status": 404}, omaha.ERR_DOWNLOAD_TRANSFER, "HTTP 404"),
    "payload HTTP 500": (lambda w, t, p: {"payload_status": 500}, omaha.ERR_DOWNLOAD_TRANSFER, "HTTP 500"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_refused(case: str, world: World, fake_server, host, tmp_path: Path) -> None:
    good = world.build("1.1.0", seed=2).payload.read_bytes()
    changes, code, words = CASES[case]
    fake_server.script.payload = good
    for k, v in changes(world, tmp_path, good).items():
        setattr(fake_server.script, k, v)
    h = host(fake_server.url)
    a_before = hashlib.sha256(slot_bytes(h.disk, 3)).hexdigest()
    attrs_before = slot_attrs(h.disk)

    d = Daemon(h.options())
    assert d.run_once() == 1
    st = d.status()
    assert st["state"] == "IDLE" and st["last_error_code"] == code
    assert words.lower() in st["last_error"].lower(), st["last_error"]
    assert "\n" not in st["last_error"]
    assert omaha.Event(3, 0, code) in fake_server.events  # the error event reached the server
    assert hashlib.sha256(slot_bytes(h.disk, 3)).hexdigest() == a_before
    assert slot_attrs(h.disk) == attrs_before
    b = slot_attrs(h.disk)["B"]
    assert b[0] == 0 or (b[1] == 0 and not b[2])  # B never bootable
    if case == "server sends more than announced":
        assert len(fake_server.payload_gets) == 1  # read to the bound (+1 byte), no retry of a lying server


def test_http_errors_back_off(fake_server, host, world: World) -> None:
    """Consecutive failures double the next check interval (capped at 4 h); a success resets it."""
    fake_server.script.omaha_status = 500
    h = host(fake_server.url)
    for _ in range(3):
        assert Daemon(h.options()).run_once() == 1
    d = Daemon(h.options())
    assert d.st.consecutive_failures == 3
    half = INTERVAL[1] / 2
    assert INTERVAL[0] * 2 - half <= next_interval(1) <= INTERVAL[0] * 2 + half
    assert 4 * 3600 - half <= next_interval(3) <= 4 * 3600 + half  # doubled twice more, capped at 4 h
    fake_server.script.omaha_status = 200
    fake_server.script.noupdate = True
    fake_server.script.poll_interval = 1234
    assert d.run_once() == 0 and d.st.consecutive_failures == 0
    assert d.poll_interval == 1234 and next_interval(0, d.poll_interval) == 1234


def test_cli_bad_input_one_line(world: World, ue_argv: list[str], tmp_path: Path) -> None:
    disk = world.disk(tmp_path / "disk.raw")
    b = world.build("1.1.0", seed=2)
    cases = [
        (["apply", str(tmp_path / "missing.payload"), "--disk", str(disk), "--key", str(world.pub)], "does not exist"),
        (["apply", str(b.payload), "--disk", str(disk), "--key", str(world.pub), "--slot", "A"], "running slot"),
        (["apply", str(b.payload), "--disk", str(disk), "--key", str(world.pub), "--slot", "C"], "use A or B"),
        (["apply", str(b.payload), "--disk", str(disk), "--key", str(world.pub), "--newer-than", "1.1.0"],
         "not newer"),
        (["apply", str(b.usr), "--disk", str(disk), "--key", str(world.pub)], "bad magic"),
        (["apply", str(b.payload), "--disk", str(tmp_path / "nodisk.raw"), "--key", str(world.pub)], "nodisk"),
        (["serve", str(tmp_path / "nothing")], "not a directory"),
        (["check", "--socket", str(tmp_path / "none.sock")], "no update daemon"),
        (["status", "--socket", str(tmp_path / "none.sock"), "--state-dir", str(tmp_path / "none")],
         "no update daemon"),
    ]
    before = slot_attrs(disk)
    for args, words in cases:
        r = run_ue(ue_argv, *args)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, r.stderr)
    assert slot_attrs(disk) == before


FIFO_CASES = ["payload", "--disk", "--key", "daemon --conf", "daemon --release", "daemon --lock-conf",
              "daemon --machine-id-file", "daemon --boot-id-file", "daemon --disk", "daemon --key", "keys dir entry"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", FIFO_CASES)
def test_fifo_inputs_refused_not_hung(case: str, world: World, fake_server, host, ue_argv: list[str],
                                      tmp_path: Path) -> None:
    """A FIFO where a file is expected blocked open() for ever; now one error line naming it."""
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    b = world.build("1.1.0", seed=2)
    disk = world.disk(tmp_path / "disk.raw")
    if not case.startswith(("daemon", "keys")):
        args = {"payload": [str(fifo), "--disk", str(disk), "--key", str(world.pub)],
                "--disk": [str(b.payload), "--disk", str(fifo), "--key", str(world.pub)],
                "--key": [str(b.payload), "--disk", str(disk), "--key", str(fifo)]}[case]
        r = run_ue(ue_argv, "apply", *args, timeout=30)
        assert r.returncode == 2
    else:
        fake_server.script.noupdate = True
        h = host(fake_server.url)
        name = {"daemon --conf": "update.conf", "daemon --release": "release", "daemon --lock-conf": "lock.conf",
                "daemon --machine-id-file": "machine-id", "daemon --boot-id-file": "boot_id",
                "daemon --disk": "disk.raw", "keys dir entry": "keys/extra.pub"}.get(case)
        extra: list[str] = []
        if case == "daemon --key":
            extra = ["--key", str(fifo)]
        else:
            (h.root / name).unlink(missing_ok=True)
            os.mkfifo(h.root / name)
        r = run_ue(ue_argv, *h.argv(*extra), timeout=30)
        assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "FIFO" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert slot_attrs(disk)["B"] == (0, 0, False)
