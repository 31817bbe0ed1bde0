"""Bounds on what the lock reads and writes, so hostile or broken input gets one clear error.

- JSON (a FleetLock request body, a semaphore value read from etcd) is parsed by
  `parse_json_bounded`: nesting deeper than MAX_JSON_DEPTH is refused as BadJson instead of
  reaching a RecursionError (in the parser, or later when the value is written back).
- total_slots is 0..MAX_SLOTS: Airlock keeps it in a Go uint64 and compares it as an int, so a
  larger count is one Airlock cannot read (or reads as "every slot taken").
- A holder id that takes a slot is 1..MAX_ID_BYTES bytes of printable characters, no whitespace:
  Airlock takes any non-empty string, but an id with control characters or of megabytes cannot
  be shown, logged or given back sensibly, and every holder is in every semaphore write.
- A semaphore write must fit in one etcd request (ETCD_MAX_REQUEST_BYTES, etcd's default
  --max-request-bytes); past it etcd refuses the txn, which reads like a dead cluster.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import BadJson, BadLockId, BadSlotCount

MAX_JSON_DEPTH = 32
MAX_SLOTS = 2**63 - 1
MAX_ID_BYTES = 256
ETCD_MAX_REQUEST_BYTES = 1572864  # etcd's default --max-request-bytes (1.5 MiB)
TXN_OVERHEAD = 1024  # keys, compare and failure ops of a semaphore txn, and etcd's request envelope


def parse_json_bounded(raw: bytes | str, what: str, *, max_bytes: int | None = None,
                       max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with limits; raises BadJson naming `what` (e.g. "request body") and the problem.

    The FleetLock server calls this on request bodies (then answers 400 with the message)."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise BadJson(f"{what} is {len(raw)} bytes, more than the {max_bytes} allowed")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise BadJson(f"{what} is nested too deeply (more than {max_depth} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadJson(f"{what} is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if json_depth(doc, max_depth) > max_depth:
        raise BadJson(f"{what} is nested too deeply (more than {max_depth} levels)")
    return doc


def json_depth(doc: Any, stop: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed document (a scalar is 0), walked without recursion; stops
    counting once it passes `stop`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > stop:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_slots(slots: Any) -> int:
    """A slot count to write: a whole number 0..MAX_SLOTS."""
    if not isinstance(slots, int) or isinstance(slots, bool) or not 0 <= slots <= MAX_SLOTS:
        raise BadSlotCount(f"slot count must be a whole number, 0 or more and at most {MAX_SLOTS}, "
                           f"not {shown(slots)}")
    return slots


def shown(value: Any) -> str:
    """A value for an error message, short (a huge int has no repr past 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit number"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_holder_id(ident: Any, what: str = "lock id") -> str:
    """A holder id that may take a slot; raises BadLockId with the reason."""
    if not isinstance(ident, str) or not ident:
        raise BadLockId(f"{what} is missing or empty")
    try:
        size = len(ident.encode())
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\ud800"
        raise BadLockId(f"{what} is not valid UTF-8 text") from None
    if size > MAX_ID_BYTES:
        raise BadLockId(f"{what} is {size} bytes long, more than the {MAX_ID_BYTES} allowed")
    if not ident.isprintable() or " " in ident:
        raise BadLockId(f"{what} {ident[:40]!r} has whitespace or control characters: use printable "
                        "characters only (obelisk uses the host's 32-hex-digit app id)")
    return ident
