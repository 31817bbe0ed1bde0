"""The daemon's state machine: the transition table, the one place that moves and persists the state, the
chain of steps a run walks (against the scriptable loopback server), recovery of interrupted runs, and the
modes of the files the daemon makes whatever the umask."""

from __future__ import annotations

import ast
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ue_helpers import World

from update_engine import omaha
from update_engine.daemon import Daemon
from update_engine.state import (
    IN_FLIGHT,
    STATE_FILE,
    TRANSITIONS,
    StateMachine,
    Status,
    load_state,
)

S = Status
HAPPY = [S.IDLE, S.CHECKING_FOR_UPDATE, S.UPDATE_AVAILABLE, S.DOWNLOADING, S.VERIFYING, S.FINALIZING,
         S.UPDATED_NEED_REBOOT]


def test_table_covers_every_state_and_every_state_can_go_idle() -> None:
    assert set(TRANSITIONS) == set(Status)
    for here, allowed in TRANSITIONS.items():
        assert S.IDLE in allowed, here  # stopped, killed, crashed: a run starts over from IDLE
        assert here in allowed, here  # staying put while a field changes
        assert allowed <= set(Status)
    for a, b in zip(HAPPY, HAPPY[1:], strict=False):
        assert b in TRANSITIONS[a], (a, b)
    for failing in (S.CHECKING_FOR_UPDATE, S.UPDATE_AVAILABLE, S.DOWNLOADING, S.VERIFYING, S.FINALIZING):
        assert S.REPORTING_ERROR_EVENT in TRANSITIONS[failing]
    assert TRANSITIONS[S.REPORTING_ERROR_EVENT] == {S.REPORTING_ERROR_EVENT, S.IDLE}
    assert set(Status) - {S.IDLE, S.UPDATED_NEED_REBOOT} == IN_FLIGHT


FORBIDDEN = [(S.IDLE, S.DOWNLOADING), (S.IDLE, S.FINALIZING), (S.CHECKING_FOR_UPDATE, S.DOWNLOADING),
             (S.DOWNLOADING, S.UPDATED_NEED_REBOOT), (S.VERIFYING, S.DOWNLOADING),
             (S.UPDATED_NEED_REBOOT, S.DOWNLOADING), (S.UPDATED_NEED_REBOOT, S.CHECKING_FOR_UPDATE),
             (S.REPORTING_ERROR_EVENT, S.CHECKING_FOR_UPDATE), (S.IDLE, S.REPORTING_ERROR_EVENT)]


def _walk(m: StateMachine, path: list[Status]) -> None:
    for s in path:
        m.move(s)


@pytest.mark.parametrize("here, to", FORBIDDEN, ids=[f"{a}->{b}" for a, b in FORBIDDEN])
def test_forbidden_moves_raise_and_change_nothing(tmp_path: Path, here: Status, to: Status) -> None:
    m = StateMachine(tmp_path)
    route = {S.IDLE: [], S.CHECKING_FOR_UPDATE: [S.CHECKING_FOR_UPDATE], S.DOWNLOADING: HAPPY[1:4],
             S.VERIFYING: HAPPY[1:5], S.UPDATED_NEED_REBOOT: HAPPY[1:],
             S.REPORTING_ERROR_EVENT: [S.CHECKING_FOR_UPDATE, S.REPORTING_ERROR_EVENT]}[here]
    _walk(m, route)
    assert m.state == here
    saved = (tmp_path / STATE_FILE).read_bytes() if route else b""
    with pytest.raises(RuntimeError, match=f"bug: update state {here} cannot go to {to}"):
        m.move(to, new_version="9.9.9")
    assert m.state == here and m.st.new_version == ""
    if route:
        assert (tmp_path / STATE_FILE).read_bytes() == saved


def test_move_persists_and_notifies_every_move(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    m = StateMachine(tmp_path, notify=lambda st: seen.append((st.state, st.new_version)))
    m.move(S.CHECKING_FOR_UPDATE)
    m.move(S.UPDATE_AVAILABLE, new_version="1.2.3", new_size=10)
    m.record(last_error="x")
    assert seen == [("CHECKING_FOR_UPDATE", ""), ("UPDATE_AVAILABLE", "1.2.3"), ("UPDATE_AVAILABLE", "1.2.3")]
    back = load_state(tmp_path)
    assert back.state == "UPDATE_AVAILABLE" and back.new_version == "1.2.3" and back.last_error == "x"
    with pytest.raises(AttributeError, match="no field 'bogus'"):
        m.record(bogus=1)
    assert StateMachine(tmp_path).public() == m.public()


def test_progress_is_throttled(tmp_path: Path) -> None:
    m = StateMachine(tmp_path, save_every=3600)
    _walk(m, HAPPY[1:4])
    m.progress(0.25)  # a move just saved: this one waits
    assert load_state(tmp_path).progress == 0.0 and m.st.progress == 0.25
    m.save_every = 0
    m.progress(0.5)
    assert load_state(tmp_path).progress == 0.5


def test_unknown_saved_state_starts_idle(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"state": "EXPLODING", "current_version": "1.0.0"}))
    m = StateMachine(tmp_path)
    assert m.state == S.IDLE and m.st.current_version == "1.0.0"


def test_only_the_state_module_persists_or_sets_the_state() -> None:
    """No direct save_state and no assignment to ``.state`` outside update_engine/state.py."""
    root = Path(__file__).resolve().parents[2] / "update_engine"
    wrong = []
    for path in sorted(root.glob("*.py")):
        if path.name == "state.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name | ast.Attribute) and getattr(node, "id", getattr(node, "attr", "")) \
                    == "save_state":
                wrong.append(f"{path.name}:{node.lineno} save_state")
            if isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and t.attr == "state":
                        wrong.append(f"{path.name}:{node.lineno} .state =")
    assert not wrong, wrong


def _states(d: Daemon) -> list[str]:
    seen: list[str] = []
    d.machine.notify = lambda st: seen.append(st.state) if not seen or seen[-1] != st.state else None
    return seen


@pytest.mark.timeout(120)
def test_a_run_walks_the_chain(world: World, fake_server, host) -> None:
    fake_server.script.payload = world.build("1.1.0", seed=2).payload.read_bytes()
    h = host(fake_server.url)
    d = Daemon(h.options())
    seen = _states(d)
    assert d.run_once() == 0
    assert seen == [s.value for s in HAPPY]
    assert [(e.type, e.result) for e in fake_server.events] == [(3, 2), (13, 1), (14, 1), (3, 1)]
    st = d.status()
    assert st["staged_slot"] == "B" and st["staged_version"] == "1.1.0" and st["previous_version"] == "1.0.0"


@pytest.mark.timeout(120)
def test_a_failure_is_reported_with_its_own_code(world: World, fake_server, host) -> None:
    fake_server.script.payload = world.build("1.1.0", seed=2).payload.read_bytes()
    fake_server.script.announce_size = len(fake_server.script.payload) + 1
    h = host(fake_server.url)
    d = Daemon(h.options())
    seen = _states(d)
    assert d.run_once() == 1
    assert seen == ["IDLE", "CHECKING_FOR_UPDATE", "UPDATE_AVAILABLE", "DOWNLOADING", "REPORTING_ERROR_EVENT", "IDLE"]
    assert d.status()["last_error_code"] == omaha.ERR_PAYLOAD_SIZE
    err = next(e for e in fake_server.events if (e.type, e.result) == (3, 0))
    assert err.errorcode == omaha.ERR_PAYLOAD_SIZE and "the server announced" in (err.reason or "")  # its own words
    assert d.st.consecutive_failures == 1


@pytest.mark.timeout(120)
def test_stopped_run_is_resumed_from_idle(world: World, fake_server, host) -> None:
    """SIGTERM mid-download keeps the state (and the checkpoint); the next daemon starts over from IDLE."""
    fake_server.script.payload = world.build("1.1.0", seed=2).payload.read_bytes()
    h = host(fake_server.url)
    d = Daemon(h.options())
    d.stop_event.set()
    assert d.run_once() == 1
    assert d.status()["state"] == "DOWNLOADING" and "resumes" in d.status()["last_error"]
    again = Daemon(h.options())
    assert again.machine.state == S.DOWNLOADING  # as saved
    seen = _states(again)
    assert again.run_once() == 0
    assert seen[0] == "IDLE" and seen[-1] == "UPDATED_NEED_REBOOT"


@pytest.mark.timeout(60)
def test_no_update_and_settings_errors(fake_server, host, tmp_path: Path) -> None:
    fake_server.script.noupdate = True
    h = host(fake_server.url)
    d = Daemon(h.options())
    seen = _states(d)
    assert d.run_once() == 0 and seen == ["IDLE", "CHECKING_FOR_UPDATE", "IDLE"]
    (h.root / "update.conf").write_text("SERVER=ftp://nope\n")
    assert d.run_once() == 1
    assert "SERVER" in d.status()["last_error"] and d.status()["state"] == "IDLE"


MODES = """
import os, sys, json, stat
from pathlib import Path
os.umask(0)
root = Path(sys.argv[1])
from update_engine.daemon import Daemon, Options
from update_engine.status_socket import StatusServer
from update_engine.progress import Progress, start
d = Daemon(Options(state_dir=root / "var/lib/obelisk", machine_id_path=root / "no-machine-id",
                   boot_id_path=root / "no-boot-id"))
mid = d.machine_id()
d.machine.record(current_version="1.0.0")
start(d.opts.state_dir, b"manifest", Progress("id", "disk", 4, 0))
srv = StatusServer(root / "run/obelisk/update.sock", d)
srv.server_close()
mode = lambda p: oct(stat.S_IMODE(os.stat(p).st_mode))
print(json.dumps({str(p.relative_to(root)): mode(p) for p in sorted(root.rglob("*"))}))
"""


@pytest.mark.timeout(60)
def test_file_modes_do_not_follow_the_umask(tmp_path: Path) -> None:
    """Under umask 000 the socket folder was 0777 and the state dir's machine-id 0666."""
    r = subprocess.run([sys.executable, "-c", MODES, str(tmp_path)], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr
    modes = json.loads(r.stdout)
    assert modes == {
        "run": "0o755", "run/obelisk": "0o755", "run/obelisk/update.sock": "0o600",
        "var": "0o755", "var/lib": "0o755", "var/lib/obelisk": "0o700",
        "var/lib/obelisk/machine-id": "0o644", "var/lib/obelisk/state.json": "0o600",
        "var/lib/obelisk/apply-manifest.bin": "0o600", "var/lib/obelisk/apply-progress.json": "0o600",
    }, modes
    assert stat.S_IMODE((tmp_path / "var/lib/obelisk").stat().st_mode) == 0o700


@pytest.mark.timeout(120)
def test_first_check_comes_soon_only_after_a_reboot_into_a_staged_update(world: World, fake_server, host) -> None:
    """The reboot lock is held until the first run after the update's reboot, so that run is not minutes away."""
    from update_engine.daemon import AFTER_UPDATE_CHECK, FIRST_CHECK

    fake_server.script.payload = world.build("1.1.0", seed=2).payload.read_bytes()
    h = host(fake_server.url)
    d = Daemon(h.options())
    assert d.first_check_delay() == FIRST_CHECK  # nothing staged
    assert d.run_once() == 0
    assert Daemon(h.options()).first_check_delay() == FIRST_CHECK  # staged, same boot: the reboot is still due
    h.options().boot_id_path.write_text("another-boot\n")
    assert Daemon(h.options()).first_check_delay() == AFTER_UPDATE_CHECK
    assert AFTER_UPDATE_CHECK[0] + AFTER_UPDATE_CHECK[1] / 2 < FIRST_CHECK[0] - FIRST_CHECK[1] / 2
