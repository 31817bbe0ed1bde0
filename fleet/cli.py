"""`obelisk fleet ...`: see and steer the fleet through a running update server's API.

Every command takes `--server` (or OBELISK_FLEET_SERVER) and a token (`--token-file`, or
OBELISK_FLEET_TOKEN_FILE / OBELISK_FLEET_TOKEN), prints a table or, with `--json`, the server's JSON.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from fleet.client import Client, FleetError, seg
from obelisk.errors import ObeliskError, clean_errors
from obelisk.inputs import InputFileError, check_input

app = typer.Typer(help="See and steer the fleet: instances, groups, rollouts (talks to 'obelisk update serve').",
                  no_args_is_help=True, pretty_exceptions_enable=False)
rollout_app = typer.Typer(help="Rollout policy of a group: set, pause, resume, preview.", no_args_is_help=True)
channel_app = typer.Typer(help="Channels: which release a line of groups follows.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
app.add_typer(channel_app, name="channel")

SERVER = typer.Option(None, "--server", envvar="OBELISK_FLEET_SERVER",
                      help="update server URL (default http://127.0.0.1:8080)")
TOKEN_FILE = typer.Option(None, "--token-file", envvar="OBELISK_FLEET_TOKEN_FILE",
                          help="file holding the bearer token (or set OBELISK_FLEET_TOKEN)")
JSON = typer.Option(False, "--json", help="print the server's JSON")


class TokenError(ObeliskError):
    """No usable bearer token was given."""


def _client(server: str | None, token_file: Path | None) -> Client:
    token = os.environ.get("OBELISK_FLEET_TOKEN", "")
    if token_file is not None:
        try:
            check_input(token_file, "token file")
            token = token_file.read_text().strip()
        except InputFileError as exc:
            raise TokenError(str(exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"cannot read the token file {token_file}: {exc}") from None
    if not token or any(c.isspace() for c in token):
        raise TokenError("no bearer token: pass --token-file FILE or set OBELISK_FLEET_TOKEN(_FILE)")
    server = server or "http://127.0.0.1:8080"
    if not server.startswith(("http://", "https://")):
        raise FleetError(f"--server {server[:60]!r} is not an http:// or https:// URL")
    return Client(server, token)


def _out(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if t is not None else "-"


def _safe(text: Any) -> str:
    """Host-sent strings printed without terminal control characters."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


# ---------------------------------------------------------------- reading


@app.command()
def status(server: str | None = SERVER, token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """Instances per group, version and status; halted and paused groups."""
    with clean_errors():
        d = _client(server, token_file).get("/status")
        rows = [[c["group"], c["version"], c["status"], c["count"]] for c in d["counts"]]
        text = f"{d['instances']} instance(s), {d['stale']} not seen for {d['stale_after'] / 3600:g}h, " \
               f"{d['groups']} group(s)\n" + _table(rows, ["GROUP", "VERSION", "STATUS", "COUNT"])
        for h in d["halted"]:
            text += f"\nHALTED {h['group']}: {_safe(h['reason'])}"
        for p in d["paused"]:
            text += f"\npaused {p}"
        _out(d, as_json, text)


@app.command()
def groups(server: str | None = SERVER, token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """Every group: its channel and release, its rollout state and policy."""
    with clean_errors():
        d = _client(server, token_file).get("/groups")
        rows = []
        for g in d["groups"]:
            state = "halted" if g["halted"] else "paused" if g["paused"] else "running"
            p = g["policy"]
            rate = f"{p['max_updates_per_period']}/{p['period']}" if p["max_updates_per_period"] else "-"
            rows.append([g["name"], g["channel"], g["release"] or "-", state, rate, p["windows"] or "always",
                         len(p["waves"]) or "-", p["soak"], "on" if p["safe_mode"] else "off"])
        text = _table(rows, ["GROUP", "CHANNEL", "RELEASE", "STATE", "RATE", "WINDOWS", "WAVES", "SOAK", "SAFE"])
        for g in d["groups"]:
            if g["halted"]:
                text += f"\n{g['name']}: {_safe(g['halt_reason'])}"
        _out(d, as_json, text)


@app.command()
def instances(group: str | None = typer.Option(None, help="only this group"),
              version: str | None = typer.Option(None, help="only this version"),
              status: str | None = typer.Option(None, help="only this status (checking, granted, downloading, "
                                                           "downloaded, staged, complete, error, rolled_back)"),
              stale: bool = typer.Option(False, help="only instances that stopped checking in"),
              limit: int = typer.Option(100, help="at most this many (up to 1000)"),
              offset: int = typer.Option(0, help="skip this many (paging)"),
              server: str | None = SERVER, token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """Instances with filters and paging."""
    with clean_errors():
        d = _client(server, token_file).get("/instances", group=group, version=version, status=status,
                                            stale="1" if stale else None, limit=limit, offset=offset)
        rows = [[_safe(i["machine_id"]), i["group_name"], _safe(i["version"]), i["status"] + (" (stale)" if
                i["stale"] else ""), i["error_code"] if i["error_code"] is not None else "", _when(i["last_checkin"]),
                 _safe(i["ip"]), _safe(i["note"])[:60]] for i in d["instances"]]
        shown = f"{d['offset'] + 1}-{d['offset'] + len(d['instances'])}" if d["instances"] else "none"
        text = _table(rows, ["MACHINE ID", "GROUP", "VERSION", "STATUS", "ERR", "LAST CHECK-IN", "IP", "NOTE"])
        _out(d, as_json, f"{text}\n({shown} of {d['total']})")


@app.command()
def events(instance: str = typer.Argument(..., help="machine id"),
           limit: int = typer.Option(100, help="newest this many"),
           server: str | None = SERVER, token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """One instance's event history, newest first, with the reason text a host sent."""
    with clean_errors():
        c = _client(server, token_file)
        inst = c.get(f"/instances/{seg(instance)}")
        d = c.get(f"/instances/{seg(instance)}/events", limit=limit)
        rows = [[_when(e["at"]), f"{e['event_type']}/{e['event_result']}", e["error_code"] if e["error_code"]
                 is not None else "", e["status"] or "-", _safe(e["version"]), _safe(e["reason"])[:80]]
                for e in d["events"]]
        head = f"{_safe(inst['machine_id'])}: {inst['status']} on {_safe(inst['version'])} in {inst['group_name']}"
        if inst["reason"]:
            head += f" (error {inst['error_code']}: {_safe(inst['reason'])})"
        _out({"instance": inst, **d}, as_json,
             head + "\n" + _table(rows, ["AT", "EVENT", "ERR", "STATUS", "VERSION", "REASON"]))


# ---------------------------------------------------------------- rollout


def _waves(text: str) -> list[list[Any]]:
    """`1h=1,4h=5,1d=100` -> [["1h", 1], ["4h", 5], ["1d", 100]] (the server checks the values)."""
    out: list[list[Any]] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        after, eq, pct = part.partition("=")
        try:
            share = float(pct.rstrip("%"))
        except ValueError:
            share = None
        if not eq or share is None:
            raise FleetError(f"--waves: {part!r} is not AFTER=PERCENT (e.g. 1h=1,4h=5,1d=100)")
        out.append([after.strip(), int(share) if share.is_integer() else share])
    return out


def _max_updates(text: str) -> int | None:
    if text.lower() in ("none", "unlimited", "off"):
        return None
    if not text.isdigit():
        raise FleetError(f"--max-updates {text[:20]!r} is not a whole number (or 'none' for no limit)")
    return int(text)


def _share(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        v = float(text.rstrip("%"))
    except ValueError:
        raise FleetError(f"--halt-share {text[:20]!r} is not a share (0.2 or 20%, or 'off')") from None
    return v / 100 if text.endswith("%") else v


@rollout_app.command("set")
def rollout_set(group: str = typer.Argument(..., help="group (Omaha track)"),
                enable: bool | None = typer.Option(None, "--enable/--disable", help="updates on or off"),
                max_updates: str | None = typer.Option(None, help="at most N updates started per period ('none')"),
                period: str | None = typer.Option(None, help="the rate's period, e.g. 1h"),
                windows: str | None = typer.Option(None, help="'Mon..Fri 09:00 8h; Sat 04:00 4h' ('' = always)"),
                timezone: str | None = typer.Option(None, help="IANA time zone of the windows"),
                waves: str | None = typer.Option(None, help="AFTER=PERCENT,... e.g. 1h=1,4h=5,1d=10,6d=100 "
                                                            "('' = everyone at once)"),
                soak: str | None = typer.Option(None, help="a release waits this long after it appears, e.g. 2d"),
                safe_mode: bool | None = typer.Option(None, "--safe-mode/--no-safe-mode",
                                                      help="one host first; the rest wait for its success"),
                halt_share: str | None = typer.Option(None, help="halt when this share of the last attempts "
                                                                 "failed (0.2 or 20%; 'off')"),
                halt_window: int | None = typer.Option(None, help="the number of last finished attempts counted"),
                update_timeout: str | None = typer.Option(None, help="an update not done in this long failed"),
                retry_after: str | None = typer.Option(None, help="a failed host is offered again after this long"),
                channel: str | None = typer.Option(None, help="the channel this group follows"),
                server: str | None = SERVER, token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """Change a group's rollout policy (only the options given); creates the group if it is new."""
    with clean_errors():
        changes: dict[str, Any] = {}
        if enable is not None:
            changes["updates_enabled"] = enable
        if max_updates is not None:
            changes["max_updates_per_period"] = _max_updates(max_updates)
        for key, val in (("period", period), ("windows", windows), ("timezone", timezone), ("soak", soak),
                         ("update_timeout", update_timeout), ("retry_after", retry_after)):
            if val is not None:
                changes[key] = val
        if waves is not None:
            changes["waves"] = _waves(waves)
        if safe_mode is not None:
            changes["safe_mode"] = safe_mode
        if halt_share is not None:
            changes["halt_failure_share"] = _share(halt_share)
        if halt_window is not None:
            changes["halt_window"] = halt_window
        if not changes and channel is None:
            raise FleetError("nothing to change: give at least one option (see --help)")
        c = _client(server, token_file)
        d = c.post(f"/groups/{seg(group)}/policy", changes) if changes else c.get(f"/groups/{seg(group)}")
        if channel is not None:
            d = c.post(f"/groups/{seg(group)}/channel", {"channel": channel})
        _out(d, as_json, f"{d['name']}: channel {d['channel']}, policy {json.dumps(d['policy'], sort_keys=True)}")


@rollout_app.command("pause")
def rollout_pause(group: str = typer.Argument(...), server: str | None = SERVER,
                  token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """Stop starting updates in a group (updates under way go on)."""
    with clean_errors():
        d = _client(server, token_file).post(f"/groups/{seg(group)}/pause", {})
        _out(d, as_json, f"{d['name']}: paused")


@rollout_app.command("resume")
def rollout_resume(group: str = typer.Argument(...), server: str | None = SERVER,
                   token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """Resume a paused or halted group (a halt then counts only failures from now on)."""
    with clean_errors():
        d = _client(server, token_file).post(f"/groups/{seg(group)}/resume", {})
        _out(d, as_json, f"{d['name']}: running")


@rollout_app.command("preview")
def rollout_preview(group: str = typer.Argument(...),
                    release: str | None = typer.Argument(None, help="version (default: the group's release)"),
                    step: str = typer.Option("0s", help="assume hosts check in this often (e.g. 45m)"),
                    server: str | None = SERVER, token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """Dry run: which instances would get the release when, given waves, rate, windows and soak."""
    with clean_errors():
        d = _client(server, token_file).get(f"/groups/{seg(group)}/preview", release=release, step=step)
        entries = sorted(d["instances"], key=lambda e: (e["at"] is None, e["at"] or 0, e["seed"]))
        rows = [[_safe(e["machine_id"]), e["seed"], e["version"] or "-", _when(e["at"]), _safe(e["reason"])[:70]]
                for e in entries]
        _out(d, as_json, f"{d['group']} -> {d['release'] or 'no release'} (from {_when(d['now'])})\n"
             + _table(rows, ["MACHINE ID", "SEED", "VERSION", "STARTS", "WHY"]))


# ---------------------------------------------------------------- channels


@channel_app.command("set")
def channel_set(name: str = typer.Argument(...),
                version: str = typer.Argument(..., help="release version, or 'newest' to follow the newest"),
                floors: str | None = typer.Option(None, help="mandatory intermediate versions, e.g. 1.2.0,1.5.0 "
                                                             "('' = none)"),
                server: str | None = SERVER, token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """Point a channel at a release; groups following it offer that release."""
    with clean_errors():
        body: dict[str, Any] = {"version": None if version == "newest" else version}
        if floors is not None:
            body["floors"] = [f.strip() for f in floors.split(",") if f.strip()]
        d = _client(server, token_file).post(f"/channels/{seg(name)}", body)
        fl = ", ".join(d["floors"]) or "none"
        _out(d, as_json, f"{d['name']}: {d['version'] or 'newest'} (floors: {fl})")


@channel_app.command("list")
def channel_list(server: str | None = SERVER, token_file: Path | None = TOKEN_FILE, as_json: bool = JSON) -> None:
    """Every channel and the release it points at."""
    with clean_errors():
        d = _client(server, token_file).get("/channels")
        rows = [[c["name"], c["version"] or "newest", ", ".join(c["floors"]) or "-", _when(c["updated_at"])]
                for c in d["channels"]]
        _out(d, as_json, _table(rows, ["CHANNEL", "VERSION", "FLOORS", "UPDATED"]))
