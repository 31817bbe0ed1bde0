"""`obelisk image diff OLD NEW`: what a host running OLD downloads to stage NEW, without a host.

The same planner the host runs (``update_engine.chunkplan``): OLD's USR image plays the slot the host
keeps, NEW's payload manifest says which chunks the target has. OLD and NEW are release folders (or
payload files; a payload OLD is read as the image its data area holds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from obelisk.errors import ObeliskError, clean_errors
from update_engine import chunkplan, payload


class DiffError(ObeliskError):
    """OLD or NEW is not a release this command can compare."""


def _payload_of(path: Path) -> Path:
    p = path / "update.payload" if path.is_dir() else path
    if not p.is_file():
        raise DiffError(f"{path}: no update.payload here: pass a release folder (out/<name>/<version>) or a payload")
    return p


def read_unverified(path: Path) -> payload.Manifest:
    """A payload's manifest, shape-checked but not signature-checked: this only prints, it never stages."""
    try:
        with open(path, "rb") as f:
            head = f.read(payload.HEADER_SIZE)
            mlen, slen = payload.parse_header(head)
            blob = f.read(mlen)
            f.read(slen)
    except OSError as exc:
        raise DiffError(f"cannot read {path}: {exc.strerror}") from None
    m = payload.parse_manifest_json(blob)
    return payload._with(m, data_offset=payload.HEADER_SIZE + mlen + slen)


def old_source(old: Path) -> tuple[chunkplan.LocalSource, int]:
    """OLD's image as a source: its usr.img, else the data area of its payload."""
    usr = old / "usr.img" if old.is_dir() else None
    if usr is not None and usr.is_file():
        fd = os.open(usr, os.O_RDONLY | os.O_CLOEXEC)
        size = os.fstat(fd).st_size
        found = chunkplan.image_layout(fd, 0, size)
        return chunkplan.LocalSource(f"{old} usr.img", fd, 0, size, split=found[1] if found else 0), fd
    p = _payload_of(old)
    m = read_unverified(p)
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    return chunkplan.LocalSource(f"{old} payload", fd, m.data_offset, m.target_size, split=m.hash_offset), fd


def plan(old: Path, new: Path) -> chunkplan.Plan:
    m = read_unverified(_payload_of(new))
    if not chunkplan.adaptive_ok(m):
        raise DiffError(f"{new}: its payload has no chunk index (built before adaptive updates): a host "
                        "downloads all of it", exit_code=1)
    src, fd = old_source(old)
    try:
        return chunkplan.make_plan(m, [src])
    finally:
        os.close(fd)


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / (1 << 20):.2f} MiB)"


def diff(old: Path = typer.Argument(..., help="The release a host runs (folder or payload)"),
         new: Path = typer.Argument(..., help="The release it updates to (folder or payload)"),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """What a host on OLD downloads to reach NEW (adaptive update): reused, fetched and saved bytes."""
    with clean_errors():
        p = plan(old, new)
    doc = p.to_json()
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    full = doc["full_payload_bytes"]
    fetched = p.fetched + p.manifest_bytes
    print(f"full payload   {_size(full)}")
    print(f"reused         {_size(p.reused)} from {old}")
    print(f"fetched        {_size(fetched)} ({100 * fetched / full:.2f}% of the full payload; manifest "
          f"{p.manifest_bytes:,} + {p.requests} range requests)")
    if p.rebuilt:
        print(f"rebuilt        {_size(p.rebuilt)} of the verity hash tree, computed on the host")
    print(f"saved          {_size(full - fetched)}")
    if not p.worth_it:
        print("a host would download the whole payload instead: chunk by chunk would cost about as much")
