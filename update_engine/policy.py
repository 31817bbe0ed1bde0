"""What a payload must match before a byte of it is written: trusted keys, then the policy.

Everything here is decided from the signed manifest alone (app id, arch, newer version, the sizes
the Omaha response announced, the target fitting the slot, operations this host can apply).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from obelisk.inputs import check_input
from obelisk.signing import PublicKey, load_public_key
from obelisk.versions import compare_versions
from update_engine import omaha, payload
from update_engine.errors import ApplyError
from update_engine.payload import Manifest


@dataclass
class Policy:
    """What the payload must match. None means "not checked" (a manual apply without Omaha)."""

    app_id: str | None = None
    arch: str | None = None
    current_version: str | None = None  # the payload must be newer, unless allow_downgrade
    allow_downgrade: bool = False
    expected_size: int | None = None  # from the Omaha response
    expected_sha256: str | None = None  # hex, from the Omaha response
    expected_version: str | None = None  # from the Omaha response manifest


def load_keys(keys_dir: Path | None, extra: list[Path] | tuple[Path, ...] = ()) -> list[PublicKey]:
    """Every ``*.pub`` of ``keys_dir`` (sorted) and the ``extra`` key files, each checked to be a regular file
    first (a FIFO would block the read). Raises SigningError / InputFileError (one line each)."""
    paths = sorted(keys_dir.glob("*.pub")) if keys_dir is not None and keys_dir.is_dir() else []
    return [load_public_key(check_input(p, "public key")) for p in [*paths, *extra]]


def check_policy(m: Manifest, policy: Policy, slot_len: int) -> None:
    """Everything that can be decided from the signed manifest, before any write."""
    if policy.app_id and m.app_id.lower() != policy.app_id.lower():
        raise ApplyError(f"payload is for app {m.app_id}, this host runs {policy.app_id}: wrong release",
                         omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.arch and m.arch != policy.arch:
        raise ApplyError(f"payload is for arch {m.arch}, this host is {policy.arch}: wrong release",
                         omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.current_version and not policy.allow_downgrade and compare_versions(m.version,
                                                                                  policy.current_version) <= 0:
        raise ApplyError(f"payload version {m.version} is not newer than the running {policy.current_version}: "
                         "refusing a downgrade", omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.expected_version and compare_versions(m.version, policy.expected_version) != 0:
        raise ApplyError(f"payload version {m.version} differs from the {policy.expected_version} the server "
                         "announced", omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.expected_size is not None and m.payload_size != policy.expected_size:
        raise ApplyError(f"payload is {m.payload_size} bytes by its manifest, the server announced "
                         f"{policy.expected_size}", omaha.ERR_PAYLOAD_SIZE)
    if m.target_size > slot_len:
        raise ApplyError(f"payload target is {m.target_size} bytes, the slot holds only {slot_len}",
                         omaha.ERR_PAYLOAD_SIZE)
    for op in m.operations:
        if op.type != payload.OP_REPLACE:
            raise ApplyError(f"payload uses operation {op.type}, which this host cannot apply yet",
                             omaha.ERR_PAYLOAD_VERIFICATION)
