"""Ignition configs (spec 3.0.0 to 3.4.0) and Butane (fcos 1.0.0-1.5.0, flatcar 1.0.0-1.1.0), applied
through the same Plan and report shape as cloud-config.

    detect(raw) -> "ignition" | "butane" | None
    validate(raw, *, files_dir=None) -> IgnitionReport            (no network, no writes)
    translate(raw, *, files_dir=None) -> (bytes | None, IgnitionReport)   Butane -> Ignition JSON
    save(data, path)                                                      write it atomically
    plan(raw, root, *, files_dir=None, fetcher=None, live=None) -> (IgnitionPlan, report, warnings)
    apply(raw, root, *, files_dir=None, fetcher=None, dry_run=False, force=False, ...) -> IgnitionResult
    provisioned_by_ignition(root) -> bool       (Flatcar's rule: then cloud-config is not applied)

reader.py   JSON/YAML with positions   spec.py    schema, walk and checks per spec version
butane.py   Butane -> Ignition         merge.py   Ignition's merge rules
fetch.py    data:/http(s), bounded     passwd.py  users and groups     apply.py   render, plan, commit
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cloudconfig.ignition.apply import (
    MARKER,
    IgnitionPlan,
    IgnitionResult,
    InvalidIgnition,
    apply,
    marker_of,
    plan,
    provisioned_by_ignition,
)
from cloudconfig.ignition.fetch import Fetcher, FetchError
from cloudconfig.ignition.load import detect
from cloudconfig.ignition.load import read as validate
from cloudconfig.ignition.report import IgnitionReport
from obelisk.atomicfile import write_atomic
from obelisk.errors import ObeliskError

__all__ = ["MARKER", "FetchError", "Fetcher", "IgnitionPlan", "IgnitionReport", "IgnitionResult", "InvalidIgnition",
           "OutputError", "apply", "detect", "marker_of", "plan", "provisioned_by_ignition", "save", "translate",
           "validate"]


class OutputError(ObeliskError):
    """A translated config cannot be written where the user said."""



def translate(raw: bytes, *, files_dir: str | os.PathLike[str] | None = None) -> tuple[bytes | None, IgnitionReport]:
    """Butane (or Ignition) -> the Ignition JSON it stands for, as `butane --strict` would print it."""
    rep = validate(raw, files_dir=files_dir)
    if not rep.ok or rep.value is None:
        return None, rep
    return (json.dumps(rep.value, indent=2, sort_keys=True) + "\n").encode(), rep


def save(data: bytes, path: Path) -> None:
    """A translated config to ``path``, atomically (a reader never sees half of it)."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None
