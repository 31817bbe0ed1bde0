"""`obelisk ignition validate|translate|apply` (a typer app for the lead to mount). Thin: read, call, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from cloudconfig.ignition import apply as apply_config
from cloudconfig.ignition import translate as translate_config
from cloudconfig.ignition import validate as validate_config
from cloudconfig.ignition.apply import InvalidIgnition
from cloudconfig.ignition.fetch import ATTEMPTS, Fetcher
from obelisk.errors import EXIT_FAILED, clean_errors, fail
from obelisk.inputs import check_input

app = typer.Typer(name="ignition", no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Validate, translate and apply Ignition (spec 3.0.0-3.4.0) and Butane (fcos, flatcar) configs.")

FILES_DIR = typer.Option(None, "--files-dir", "-d", help="directory that Butane local:/trees: paths are relative to")


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with clean_errors():
        return check_input(path, "config").read_bytes()


@app.command()
def validate(
    files: list[str] = typer.Argument(..., help="Ignition JSON or Butane YAML files ('-' for standard input)"),
    files_dir: Path = FILES_DIR,
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of {line, column, level, path, message}"),
    strict: bool = typer.Option(False, "--strict", help="warnings count as errors (butane --strict)"),
) -> None:
    """Report syntax errors, wrong types, unknown keys and refused sections with JSON pointers and line numbers."""
    blobs = [(f, _read(f)) for f in files]
    out: list[dict[str, object]] = []
    bad = 0
    for name, raw in blobs:
        rep = validate_config(raw, files_dir=files_dir)
        bad += len(rep.errors) + (len(rep.entries) - len(rep.errors) if strict else 0)
        for e in rep.entries:
            if as_json:
                out.append({**e.__dict__, **({"file": name} if len(files) > 1 else {})})
            else:
                print(f"{name}: {e.text()}" if len(files) > 1 else e.text())
    if as_json:
        print(json.dumps(out, indent=2))
    raise typer.Exit(1 if bad else 0)


@app.command()
def translate(
    file: str = typer.Argument(..., help="Butane YAML (or Ignition JSON) file, '-' for standard input"),
    files_dir: Path = FILES_DIR,
    output: Path = typer.Option(None, "--output", "-o", help="write the Ignition JSON here instead of stdout"),
    strict: bool = typer.Option(False, "--strict", help="fail on warnings too"),
) -> None:
    """Print the Ignition JSON a Butane config stands for (as `butane` does)."""
    data, rep = translate_config(_read(file), files_dir=files_dir)
    for e in rep.entries:
        print(e.text(), file=sys.stderr)
    if data is None or (strict and rep.entries):
        fail(f"{file}: not translated ({len(rep.errors)} error(s), {len(rep.entries) - len(rep.errors)} "
             "warning(s))", code=EXIT_FAILED)
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        output.write_bytes(data)


@app.command()
def apply(
    file: str = typer.Argument(..., help="Ignition JSON or Butane YAML file, '-' for standard input"),
    root: Path = typer.Option(Path("/"), "--root", help="target root (default: the running system)"),
    files_dir: Path = FILES_DIR,
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would change, change nothing"),
    force: bool = typer.Option(False, "--force", help="apply although the host was provisioned already"),
    attempts: int = typer.Option(ATTEMPTS, "--attempts", help="tries per http(s) fetch"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Provision the root once (first boot): every change is planned and checked, then committed together."""
    raw = _read(file)
    with clean_errors(), Fetcher(attempts=attempts) as fetcher:
        try:
            res = apply_config(raw, root, files_dir=files_dir, fetcher=fetcher, dry_run=dry_run, force=force,
                               name=file, run_command=_run)
        except InvalidIgnition as exc:
            for e in exc.report.entries:  # the entries first; clean_errors prints the one-line summary last
                print(e.text(), file=sys.stderr)
            raise
    if as_json:
        print(json.dumps({"kind": res.kind, "root": str(root), "dry_run": dry_run, "changed": res.changed,
                          "provisioned_before": res.provisioned_before,
                          "changes": [c.describe(planned=dry_run) for c in res.changes],
                          "commands": [" ".join(c) for c in res.commands], "notes": res.notes,
                          "warnings": res.warnings}, indent=2))
        return
    for w in res.warnings:
        print(w, file=sys.stderr)
    for c in res.changes:
        print(c.describe(planned=dry_run))
    for cmd in res.commands:
        print(f"{'would ' if dry_run else ''}run: {' '.join(cmd)}")
    for n in res.notes:
        print(f"note: {n}")
    if res.changed:
        print(f"{'would apply' if dry_run else 'applied'} {len(res.changes)} change(s) to {root} from {file}")


def _run(argv: list[str]) -> None:  # pragma: no cover - systemctl exists only on the running system
    from obelisk.tools import ToolError, run

    try:
        run(argv, timeout=120)
    except ToolError as exc:
        print(f"warning: {' '.join(argv)} failed: {exc}", file=sys.stderr)
