"""The host id used as a semaphore holder: an app-specific id derived from /etc/machine-id.

Same construction as systemd's sd_id128_get_machine_app_specific() and Zincati's node_uuid:
HMAC-SHA256 keyed by the 16 machine-id bytes over the 16 app-id bytes, first 128 bits, UUIDv4
bits set, printed as 32 lowercase hex digits. The raw machine id never leaves the host (it is
meant to stay secret, see machine-id(5)); with obelisk's own app id our holder ids differ from
Zincati's, so a host that also ran Zincati cannot be mistaken for itself.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from obelisk.errors import ObeliskError

# obelisk's app id (random, fixed forever: changing it would orphan held locks).
APP_ID = bytes.fromhex("5b1f0c7e9a6d4e2b8f3c71d04ae29c65")
ZINCATI_APP_ID = bytes.fromhex("de35106b6ec24688b63afddaa156679b")


class IdentityError(ObeliskError, ValueError):
    pass


def app_specific_id(machine_id: str, app_id: bytes = APP_ID) -> str:
    raw = machine_id.strip().replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{32}", raw):
        raise IdentityError("machine id is not 32 hex digits: run 'systemd-machine-id-setup' to create one")
    digest = bytearray(hmac.new(bytes.fromhex(raw), app_id, hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40  # UUID version 4
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()


def host_id(machine_id_path: Path = Path("/etc/machine-id")) -> str:
    try:
        text = Path(machine_id_path).read_text()
    except OSError as exc:
        raise IdentityError(f"cannot read {machine_id_path}: {exc.strerror}; pass --id or create it "
                            "with 'systemd-machine-id-setup'") from None
    try:
        return app_specific_id(text)
    except IdentityError as exc:
        raise IdentityError(f"{machine_id_path}: {exc}") from None
