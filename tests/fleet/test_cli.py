"""`obelisk fleet` against a real fleet API on 127.0.0.1: every command, --json, and one-line errors.

The commands run in-process through typer's runner (the package is mounted by the root CLI as
`obelisk fleet`); the server is a real uvicorn on loopback over SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet_helpers import ADMIN, READ, T0, Served, free_port, omaha_req
from typer.testing import CliRunner

from fleet.cli import app
from update_engine import omaha

pytestmark = pytest.mark.timeout(120)


def run(s: Served | None, *args: str, token: str = ADMIN, tmp: Path | None = None):  # noqa: ANN201
    env = {"OBELISK_FLEET_TOKEN": token}
    if s is not None:
        env["OBELISK_FLEET_SERVER"] = s.url
    return CliRunner().invoke(app, list(args), env=env)


def ok_json(s: Served, *args: str, token: str = ADMIN) -> dict:
    r = run(s, *args, "--json", token=token)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_every_command_with_json(served: Served) -> None:
    f = served.fleet
    for i in range(4):
        f.check_in(omaha_req(f"{i:032x}", "1.0.0", check=False), f"10.0.0.{i}")
    f.check_in(omaha_req("e" * 32, "1.0.0", omaha.Event(3, 0, 10), check=False), "10.0.0.9")
    d = ok_json(served, "rollout", "set", "prod", "--max-updates", "2", "--period", "1h", "--waves", "0s=50,1h=100",
                "--windows", "Mon..Fri 00:00 12h", "--timezone", "UTC", "--soak", "0s", "--safe-mode",
                "--halt-share", "20%", "--halt-window", "10")
    p = d["policy"]
    assert p["max_updates_per_period"] == 2 and p["waves"] == [["0s", 50.0], ["1h", 100.0]] and p["safe_mode"]
    assert p["halt_failure_share"] == 0.2 and p["windows"] == "Mon..Fri 00:00 12h"
    assert ok_json(served, "rollout", "set", "prod", "--no-safe-mode", "--max-updates", "none")["policy"][
        "max_updates_per_period"] is None
    assert ok_json(served, "status", token=READ)["instances"] == 5
    assert [g["name"] for g in ok_json(served, "groups", token=READ)["groups"]] == ["prod"]
    page = ok_json(served, "instances", "--group", "prod", "--limit", "2", token=READ)
    assert page["total"] == 5 and len(page["instances"]) == 2
    assert ok_json(served, "instances", "--status", "error")["instances"][0]["machine_id"] == "e" * 32
    ev = ok_json(served, "events", "e" * 32, token=READ)
    assert ev["instance"]["error_code"] == 10 and ev["events"][0]["event_result"] == 0
    assert ok_json(served, "rollout", "pause", "prod")["paused"]
    assert not ok_json(served, "rollout", "resume", "prod")["paused"]
    pv = ok_json(served, "rollout", "preview", "prod", "2.0.0", "--step", "15m", token=READ)
    assert pv["release"] == "2.0.0" and len(pv["instances"]) == 5
    ch = ok_json(served, "channel", "set", "prod", "1.5.0", "--floors", "1.2.0")
    assert ch["version"] == "1.5.0" and ch["floors"] == ["1.2.0"]
    assert ok_json(served, "channel", "set", "prod", "newest")["version"] is None
    assert ok_json(served, "channel", "list")["channels"][0]["name"] == "prod"
    assert ok_json(served, "rollout", "set", "prod", "--channel", "stable")["channel"] == "stable"


def test_tables_for_people(served: Served) -> None:
    served.fleet.check_in(omaha_req("a" * 32, "1.0.0", omaha.Event(3, 0, 44), check=False), "10.0.0.1")
    run(served, "rollout", "set", "prod", "--max-updates", "3")
    r = run(served, "status", token=READ)
    assert r.exit_code == 0 and "1 instance(s)" in r.stdout and "rolled_back" in r.stdout
    r = run(served, "instances", token=READ)
    assert "a" * 32 in r.stdout and "(1-1 of 1)" in r.stdout
    r = run(served, "groups", token=READ)
    assert "3/1h" in r.stdout
    r = run(served, "events", "a" * 32, token=READ)
    assert "3/0" in r.stdout and "rolled_back" in r.stdout
    r = run(served, "rollout", "preview", "prod", token=READ)
    assert r.exit_code == 0 and "prod -> 2.0.0" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["rollout", "set", "prod", "--max-updates", "0"], "(400): policy max_updates_per_period"),
    (["rollout", "set", "prod", "--period", "soon"], "(400): policy period"),
    (["rollout", "set", "prod", "--windows", "Someday 09:00 1h"], "(400): policy windows"),
    (["rollout", "set", "prod", "--timezone", "Mars/Base"], "(400): policy windows/timezone"),
    (["rollout", "set", "prod", "--waves", "1h=150"], "(400): policy waves"),
    (["rollout", "set", "prod", "--waves", "1h:5"], "--waves"),
    (["rollout", "set", "prod", "--max-updates", "lots"], "--max-updates"),
    (["rollout", "set", "prod", "--halt-share", "most"], "--halt-share"),
    (["rollout", "set", "prod", "--halt-share", "150%"], "(400): policy halt_failure_share"),
    (["rollout", "set", "prod"], "nothing to change"),
    (["rollout", "set", "bad name", "--soak", "1h"], "(400): group name"),
    (["channel", "set", "prod", "one"], "(400): channel prod"),
    (["channel", "set", "prod", "1.0.0", "--floors", "x,y"], "(400): floors"),
    (["rollout", "pause", "nope"], "(404): no group 'nope'"),
    (["events", "nope"], "(404): no instance"),
    (["instances", "--status", "asleep"], "(400): status"),
])
def test_bad_input_is_one_line_and_stores_nothing(served: Served, args: list[str], words: str) -> None:
    before = ok_json(served, "groups")
    r = run(served, *args)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err and "Traceback" not in r.output
    assert ok_json(served, "groups") == before
    assert ok_json(served, "channel", "list")["channels"] == []


def test_read_token_cannot_change(served: Served) -> None:
    r = run(served, "rollout", "pause", "prod", token=READ)
    assert r.exit_code == 2 and "(403): this change needs an admin token" in r.stderr


def test_wrong_token_and_no_token(served: Served) -> None:
    r = run(served, "status", token="w" * 24)
    assert r.exit_code == 2 and "(401)" in r.stderr
    r = CliRunner().invoke(app, ["status"], env={"OBELISK_FLEET_SERVER": served.url, "OBELISK_FLEET_TOKEN": ""})
    assert r.exit_code == 2 and "no bearer token" in r.stderr


def test_token_file(served: Served, tmp_path: Path) -> None:
    tf = tmp_path / "token"
    tf.write_text(READ + "\n")
    r = CliRunner().invoke(app, ["status", "--json", "--token-file", str(tf)], env={"OBELISK_FLEET_SERVER": served.url})
    assert r.exit_code == 0 and json.loads(r.stdout)["instances"] == 0
    r = CliRunner().invoke(app, ["status", "--token-file", str(tmp_path)], env={"OBELISK_FLEET_SERVER": served.url})
    assert r.exit_code == 2 and r.stderr.startswith("error: ")


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    env = {"OBELISK_FLEET_SERVER": f"http://127.0.0.1:{free_port()}", "OBELISK_FLEET_TOKEN": ADMIN}
    r = CliRunner().invoke(app, ["status"], env=env)
    assert r.exit_code == 1 and r.stderr.startswith("error: cannot reach the update server")
    assert "\n" not in r.stderr.strip()
    r = CliRunner().invoke(app, ["status"], env={**env, "OBELISK_FLEET_SERVER": "ftp://x"})
    assert r.exit_code == 2 and "not an http" in r.stderr


def test_clock_used_for_stale(served: Served) -> None:
    served.fleet.check_in(omaha_req("a" * 32, "1.0.0", check=False), "x")
    served.clock.now = T0 + 3 * 86400
    assert ok_json(served, "instances", "--stale")["total"] == 1
