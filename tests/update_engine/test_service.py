"""The long-running daemon as systemd runs it: sd_notify READY/STATUS/STOPPING, the root-only status socket,
`status --json`, `check`, `watch`, SIGTERM; plus update.conf parsing and rendering."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from ue_helpers import World, run_ue

from obelisk.update_conf import UpdateConf, UpdateConfigError, load


def _wait_for(cond, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)


def test_daemon_service_notify_socket_check_watch(world: World, fake_server, host, ue_argv: list[str],
                                                  tmp_path: Path) -> None:
    fake_server.script.payload = world.build("1.1.0", seed=2).payload.read_bytes()
    fake_server.script.noupdate = True
    h = host(fake_server.url)
    sock_path = h.root / "update.sock"
    notify = tmp_path / "notify"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(notify))
    ns.settimeout(30)
    argv = [a for a in h.argv() if a != "--once"]
    p = subprocess.Popen([*ue_argv, *argv, "--first-check", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "NOTIFY_SOCKET": str(notify)})
    msgs: list[str] = []

    def reader() -> None:  # systemd reads notifications as they come; so does this
        with contextlib.suppress(OSError):
            while True:
                msgs.append(ns.recv(4096).decode())

    threading.Thread(target=reader, daemon=True).start()
    try:
        _wait_for(lambda: "READY=1" in msgs)
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        # The first scheduled check finds nothing.
        deadline = time.monotonic() + 30
        while True:
            st = json.loads(run_ue(ue_argv, "status", "--json", "--socket", str(sock_path)).stdout)
            if st["last_checked"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert st["state"] == "IDLE" and st["current_version"] == "1.0.0" and st["last_error"] is None
        # An update appears; `check` asks now, `watch` follows it to the end.
        fake_server.script.noupdate = False
        r = run_ue(ue_argv, "check", "--socket", str(sock_path))
        assert r.returncode == 0 and "requested" in r.stdout
        r = run_ue(ue_argv, "watch", "--socket", str(sock_path), "--timeout", "60", timeout=90)
        assert r.returncode == 0 and r.stdout.strip() == "UPDATED_NEED_REBOOT", r.stderr
        st = json.loads(run_ue(ue_argv, "status", "--json", "--socket", str(sock_path)).stdout)
        assert st["state"] == "UPDATED_NEED_REBOOT" and st["new_version"] == "1.1.0" and st["progress"] == 1.0
        human = run_ue(ue_argv, "status", "--socket", str(sock_path)).stdout
        assert "UPDATED_NEED_REBOOT" in human and "1.1.0" in human
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        _wait_for(lambda: "STOPPING=1" in msgs)
        assert any(m.startswith("STATUS=DOWNLOADING") for m in msgs)
        assert not sock_path.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ns.close()


def test_update_conf_parse_render_and_layering(tmp_path: Path) -> None:
    c = UpdateConf.parse("# comment\nSERVER=http://u.example:8080/v1/update/\nGROUP=beta\nREBOOT_STRATEGY=etcd-lock\n"
                         'PROXY="http://proxy:3128"\nBANDWIDTH_LIMIT=10M\n')
    assert c.group == "beta" and c.bandwidth_bytes == 10 << 20 and c.proxy == "http://proxy:3128"
    assert UpdateConf.parse(c.render()) == c
    for text, words in [("GROUP=a b", "GROUP"), ("REBOOT_STRATEGY=now", "REBOOT_STRATEGY"), ("FOO=1", "FOO"),
                        ("SERVER=ftp://x", "SERVER"), ("BANDWIDTH_LIMIT=fast", "BANDWIDTH_LIMIT"),
                        ("just words", "line 1")]:
        with pytest.raises(UpdateConfigError, match=words):
            UpdateConf.parse(text)
    usr, etc, rel = tmp_path / "usr.conf", tmp_path / "etc.conf", tmp_path / "release"
    usr.write_text("SERVER=http://usr/v1/update/\nGROUP=stable\n")
    etc.write_text("GROUP=beta\nUNKNOWN_LEGACY_KEY=1\n")  # a host keeps running with a key it does not know
    rel.write_text("VERSION=1.0.0\nAPPID={abc}\n")
    eff = load(etc, usr, rel)
    assert eff.server == "http://usr/v1/update/" and eff.group == "beta" and eff.app_id == "{abc}"
