"""`obelisk image test RELEASE [--scenario NAME]...`: boot a release in QEMU and run the A/B scenarios.

Registered by ``builder.cli`` as ``obelisk image test``. One line per scenario (PASS/FAIL, the
time, each boot's slot and time; ``*`` marks a trial boot); logs under ``RELEASE/test/``; exit 1
on any failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from builder.imagetest import scenarios
from obelisk.errors import clean_errors
from obelisk.inputs import check_input


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def test(
    release: Path = typer.Argument(..., help="A release folder (out/<name>/<version>) holding disk.raw"),
    scenario: list[str] = typer.Option(
        None, "--scenario", "-s", help="scenario to run (repeatable; default all but fleet: "
                                       f"{', '.join(scenarios.SCENARIOS)})"),
    hosts: int = typer.Option(3, min=1, max=9, help="VMs of the fleet scenario (1 proves a one-node fleet)"),
    definition: Path | None = typer.Option(None, help="image definition for the releases the scenarios build "
                                           "(default: images/<name>.toml)"),
    key: Path | None = typer.Option(None, help="private key for those builds (default: the development key)"),
    cache: Path | None = typer.Option(None, help="stage cache for those builds (default: the builder's)"),
    boot_timeout: float = typer.Option(240.0, help="seconds one boot may take before the scenario fails"),
    json_out: bool = typer.Option(False, "--json", help="print the results as JSON"),
) -> None:
    """Boot RELEASE in QEMU (TCG, OVMF) and check boot, update, rollback, badverity, power-loss, host; fleet on
    request (`-s fleet --hosts N`: N VMs on a private network roll two releases under the etcd lock)."""
    names = scenario or [n for n in scenarios.SCENARIOS if n not in scenarios.ON_REQUEST]
    unknown = [n for n in names if n not in scenarios.SCENARIOS]
    if unknown:
        _fail(f"unknown scenario {', '.join(unknown)}: use one of {', '.join(scenarios.SCENARIOS)}")
    if not (release / "disk.raw").exists() or not (release / "release.json").exists():
        _fail(f"{release} is not a release folder (no disk.raw and release.json): run 'obelisk image build' first")
    with clean_errors():
        check_input(release / "disk.raw", "disk image")
        check_input(release / "release.json", "release.json")
    try:
        meta = json.loads((release / "release.json").read_text())
    except (OSError, ValueError) as exc:
        _fail(f"{release}/release.json is unreadable ({exc}): rebuild the release")
    if not isinstance(meta, dict):
        _fail(f"{release}/release.json is not a JSON object: rebuild the release")
    if any(n in scenarios.SIGNED for n in names):
        with clean_errors():
            problem = scenarios.signing_key_problem(release, meta, key)
        if problem:
            _fail(problem)
    if definition is None:
        definition = Path("images") / f"{meta.get('name', '')}.toml"
    work = release / "test"
    work.mkdir(exist_ok=True)
    built: dict[str, Path] = {}

    def next_release() -> Path:
        if "next" not in built:
            if not definition.is_file():
                raise scenarios.ScenarioFailed(f"no image definition {definition} to build the next release: "
                                               "pass --definition")
            built["next"] = scenarios.build_release(definition, work / "releases/next",
                                                    scenarios.bump_version(meta["version"]), key, log, cache)
        return built["next"]

    def broken_release() -> Path:
        if "broken" not in built:
            if not definition.is_file():
                raise scenarios.ScenarioFailed(f"no image definition {definition} to build the broken release: "
                                               "pass --definition")
            d = scenarios.broken_definition(definition, work / "broken-def")
            built["broken"] = scenarios.build_release(d, work / "releases/broken",
                                                      scenarios.bump_version(meta["version"], 2), key, log, cache)
        return built["broken"]

    def log(msg: str) -> None:
        if not json_out:
            typer.echo(msg, err=True)

    ctx = scenarios.Context(release=release, work=work, boot_timeout=boot_timeout, next_release=next_release,
                            broken_release=broken_release, obelisk=scenarios.obelisk_cmd(), log=log,
                            signing_key=key, hosts=hosts)
    outcomes = []
    for name in names:
        log(f"scenario {name}:")
        out = scenarios.run_scenario(ctx, name)
        outcomes.append(out)
        if not json_out:
            print(out.line(), flush=True)
    if json_out:
        print(json.dumps([{"scenario": o.name, "ok": o.ok, "message": o.message, "seconds": round(o.seconds, 1),
                           "boots": [{"slot": b.slot, "trial": b.trial, "good": b.good, "seconds": round(b.seconds, 1),
                                      "verity_failed": b.verity_failed, "health_failed": b.health_failed}
                                     for b in o.boots]} for o in outcomes], indent=2))
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)
