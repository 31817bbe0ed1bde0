"""Helpers for the builder tests: run the CLI, describe a built release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OBELISK = str(Path(sys.executable).with_name("obelisk"))
EPOCH = "1704067200"
TINY = (REPO / "images/tiny.toml").read_text()


@dataclass
class Built:
    out: Path
    cache: Path
    key: Path
    pub: Path
    release: Path

    @property
    def release_json(self) -> dict:
        return json.loads((self.release / "release.json").read_text())


def obelisk(*args: str | os.PathLike[str], env: dict[str, str] | None = None, check: bool = False,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([OBELISK, *map(os.fspath, args)], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"obelisk {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def build_json(*args: str | os.PathLike[str], **kw: object) -> dict:
    proc = obelisk("image", "build", *args, "--json", check=True, **kw)  # type: ignore[arg-type]
    return json.loads(proc.stdout)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The error line of a refused command; asserts the shape every bad input must have."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]
