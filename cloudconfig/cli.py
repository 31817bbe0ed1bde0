"""`obelisk cloudconfig`: validate, translate, apply, fetch. Thin: parse, call, print.

One engine for the user: #cloud-config and scripts go to cloudconfig.apply, Ignition JSON and
Butane YAML (``cloudconfig.ignition.detect``) to cloudconfig.ignition, with the same report shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from cloudconfig import ignition
from cloudconfig.apply import InvalidConfig, apply_userdata
from cloudconfig.datasources import ORDER, Settings, environment_addresses, fetch, read_file, read_stream
from cloudconfig.validate import Report, validate_bytes
from obelisk.errors import EXIT_FAILED, clean_errors, fail

app = typer.Typer(name="cloudconfig", no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Validate and apply user-data: #cloud-config, scripts, Ignition (spec 3.0.0-3.4.0) and "
                       "Butane (fcos, flatcar) configs.")

FILES_DIR = typer.Option(None, "--files-dir", "-d", help="directory that Butane local:/trees: paths are relative to")


def _read(path: str) -> bytes:
    """A config named on the command line; a FIFO, directory or oversized file is one clean error."""
    return read_stream(sys.stdin.buffer) if path == "-" else read_file(path)


_KINDS = {"script": "a script (#!)", "empty": "empty"}


def _report(raw: bytes, files_dir: Path | None) -> Report:
    """Ignition/Butane through the Ignition engine (JSON pointers), anything else as cloud-config."""
    if ignition.detect(raw):
        return ignition.validate(raw, files_dir=files_dir)
    return validate_bytes(raw)


@app.command()
def validate(
    files: list[str] = typer.Argument(..., help="cloud-config, Ignition or Butane files ('-' for standard input)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of {line, column, level, path, message}"),
    files_dir: Path = FILES_DIR,
    strict: bool = typer.Option(False, "--strict", help="warnings count as errors (butane --strict)"),
) -> None:
    """Report syntax errors, unknown keys, wrong types and bad values with line numbers (and JSON pointers for
    Ignition/Butane); exit 1 on errors."""
    with clean_errors():
        blobs = [(f, _read(f)) for f in files]  # read all first: an unreadable file is a usage error
    out: list[dict[str, object]] = []
    errors = 0
    for name, raw in blobs:
        rep = _report(raw, files_dir)
        errors += len(rep.entries) if strict else len(rep.errors)
        if rep.kind in _KINDS:
            print(f"note: {name} is {_KINDS[rep.kind]}: there is no cloud-config to check", file=sys.stderr)
        for e in rep.entries:
            if as_json:
                out.append({**e.__dict__, **({"file": name} if len(files) > 1 else {})})
            else:
                print(f"{name}: {e.text()}" if len(files) > 1 else e.text())
    if as_json:
        print(json.dumps(out, indent=2))
    raise typer.Exit(1 if errors else 0)


@app.command()
def translate(
    file: str = typer.Argument(..., help="Butane YAML (or Ignition JSON) file, '-' for standard input"),
    files_dir: Path = FILES_DIR,
    output: Path = typer.Option(None, "--output", "-o", help="write the Ignition JSON here instead of stdout"),
    strict: bool = typer.Option(False, "--strict", help="fail on warnings too"),
) -> None:
    """Print the Ignition JSON a Butane config stands for (as `butane` does); exit 1 on errors."""
    with clean_errors():
        raw = _read(file)
    data, rep = ignition.translate(raw, files_dir=files_dir)
    for e in rep.entries:
        print(e.text(), file=sys.stderr)
    if data is None or (strict and rep.entries):
        fail(f"{file}: not translated ({len(rep.errors)} error(s), {len(rep.entries) - len(rep.errors)} "
             "warning(s))", code=EXIT_FAILED)
    if output is None:
        sys.stdout.buffer.write(data)
        return
    with clean_errors():
        ignition.save(data, output)


def _settings(file: str | None, cmdline: Path | None, ec2_endpoint: str | None, configdrive: list[Path] | None,
              nocloud: list[Path] | None, timeout: float, attempts: int, by_label: Path) -> Settings:
    s = Settings(file=Path(file) if file else None, timeout=timeout, attempts=attempts, by_label=by_label,
                 log=lambda m: print(m, file=sys.stderr))
    if cmdline:
        s.cmdline = cmdline
    if ec2_endpoint:
        s.ec2_endpoint = ec2_endpoint
    if configdrive is not None:
        s.configdrive_dirs = tuple(str(p) for p in configdrive)
    if nocloud is not None:
        s.nocloud_dirs = tuple(str(p) for p in nocloud)
    return s


_DS_HELP = f"use only this datasource: {', '.join(ORDER)}"


@app.command()
def apply(
    file: str = typer.Argument(None, help="user-data file; without it the datasources are probed in order"),
    datasource: str = typer.Option(None, "--datasource", help=_DS_HELP),
    root: Path = typer.Option(Path("/"), "--root", help="target root (default: the running system)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would change, change nothing"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    cmdline: Path = typer.Option(None, "--cmdline", help="kernel command line to read (default /proc/cmdline)"),
    ec2_endpoint: str = typer.Option(None, "--ec2-endpoint", help="EC2 metadata URL (default 169.254.169.254)"),
    configdrive: list[Path] = typer.Option(None, "--configdrive", help="config-drive directory (repeatable)"),
    nocloud: list[Path] = typer.Option(None, "--nocloud", help="NoCloud seed directory (repeatable)"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds per metadata request"),
    attempts: int = typer.Option(5, "--attempts", help="tries per metadata request (and per Ignition http(s) fetch)"),
    by_label: Path = typer.Option(Path("/dev/disk/by-label"), "--by-label",
                                  help="where config-2/CIDATA volumes are looked up by label"),
    files_dir: Path = FILES_DIR,
    force: bool = typer.Option(False, "--force", help="Ignition: apply although the host was provisioned already"),
    ignition_only: bool = typer.Option(False, "--ignition-only",
                                       help="apply the user-data only when it is an Ignition/Butane config (the "
                                            "first-boot unit); anything else is left to the cloud-config unit"),
) -> None:
    """Apply user-data to the target root: users, keys, files, units, etcd/update/lock settings (cloud-config, on
    every boot, idempotent) or an Ignition/Butane config (first boot only)."""
    s = _settings(file, cmdline, ec2_endpoint, configdrive, nocloud, timeout, attempts, by_label)
    with clean_errors(), ignition.Fetcher(attempts=attempts) as fetcher:
        got = fetch(s, datasource)
        if got is None:
            print(f"no user-data found (looked at: {', '.join(ORDER)}); nothing to do", file=sys.stderr)
            return
        if ignition_only and not ignition.detect(got.userdata):
            print(f"note: the user-data from {got.source} is not an Ignition or Butane config; nothing to do "
                  "(--ignition-only)", file=sys.stderr)
            return
        try:
            res = apply_userdata(got.userdata, root, metadata=got.metadata, addresses=environment_addresses(),
                                 dry_run=dry_run, name=file or got.source, files_dir=files_dir, force=force,
                                 fetcher=fetcher)
        except (InvalidConfig, ignition.InvalidIgnition) as exc:  # the report first, then clean_errors' line (exit 1)
            for e in exc.report.entries:
                print(e.text(), file=sys.stderr)
            raise
    if as_json:
        print(json.dumps({
            "source": got.source, "kind": res.kind, "root": str(root), "dry_run": dry_run, "changed": res.changed,
            "skipped": res.skipped,
            "changes": [c.describe(planned=dry_run) for c in res.changes],
            "commands": [" ".join(c) for c in res.commands],
            "notes": res.notes, "warnings": res.warnings,
        }, indent=2))
        return
    for w in res.warnings:
        print(w, file=sys.stderr)
    verb = "would " if dry_run else ""
    for c in res.changes:
        print(c.describe(planned=dry_run))
    for cmd in res.commands:
        print(f"{verb}run: {' '.join(cmd)}")
    for n in res.notes:
        print(f"note: {n}")
    if res.skipped:
        return
    if not res.changed:
        print(f"nothing to change: {root} already matches the config from {got.source}")
    else:
        print(f"{'would apply' if dry_run else 'applied'} {len(res.changes)} change(s) to {root} "
              f"from {got.source}")


@app.command("fetch")
def fetch_cmd(
    datasource: str = typer.Option(None, "--datasource", help=_DS_HELP),
    cmdline: Path = typer.Option(None, "--cmdline", help="kernel command line to read (default /proc/cmdline)"),
    ec2_endpoint: str = typer.Option(None, "--ec2-endpoint", help="EC2 metadata URL"),
    configdrive: list[Path] = typer.Option(None, "--configdrive", help="config-drive directory (repeatable)"),
    nocloud: list[Path] = typer.Option(None, "--nocloud", help="NoCloud seed directory (repeatable)"),
    timeout: float = typer.Option(10.0, "--timeout"),
    attempts: int = typer.Option(5, "--attempts"),
    by_label: Path = typer.Option(Path("/dev/disk/by-label"), "--by-label"),
    as_json: bool = typer.Option(False, "--json", help="metadata and user-data as JSON"),
) -> None:
    """Print the user-data (and with --json the metadata) the datasources offer."""
    s = _settings(None, cmdline, ec2_endpoint, configdrive, nocloud, timeout, attempts, by_label)
    with clean_errors():
        got = fetch(s, datasource)
    if got is None:
        fail(f"no user-data found (looked at: {', '.join(ORDER)})", code=1)
    if as_json:
        print(json.dumps({"source": got.source, "metadata": got.metadata.__dict__,
                          "userdata": got.userdata.decode("utf-8", "replace")}, indent=2))
    else:
        sys.stdout.buffer.write(got.userdata)


@app.command("status")
def status_cmd(
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Whether the services cloud-config set up (etcd, the update daemon) came up, and why not (from the journal).
    Exit 1 when one of them failed."""
    from cloudconfig import status
    from obelisk.tools import run

    def runner(argv: list[str]) -> str:
        return run(argv, check=False, timeout=30).stdout

    with clean_errors():
        states = status.status(runner)
    if as_json:
        print(json.dumps(status.to_json(states), indent=2))
    else:
        for st in states:
            print(st.line())
    if not all(s.ok for s in states):
        raise typer.Exit(EXIT_FAILED)
