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
from update_engine.installed import Installed
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
    target: str = "this host"  # what app_id/arch/current_version were read from, for the messages
    hint_overrides: bool = False  # a manual apply: say which flag would accept the payload anyway


@dataclass(frozen=True)
class Overrides:
    """What the user of a manual ``update apply`` said; each one given replaces what the target says."""

    newer_than: str | None = None
    app_id: str | None = None
    arch: str | None = None
    allow_downgrade: bool = False


def resolve(installed: Installed | None, o: Overrides) -> tuple[Policy, list[str]]:
    """The policy of a manual apply: app id, arch and "newer than" from what the target runs, each
    explicit flag instead, and one note per override (or per check left out) for the user to read."""
    notes: list[str] = []
    have = installed or Installed(None, None, None, "the target (no bootable slot)")
    if installed is None:
        notes.append("the target has no bootable slot: nothing to compare app id, arch or version with")

    def pick(flag: str, given: str | None, found: str | None, what: str) -> str | None:
        if given is not None:
            # A higher --newer-than only tightens the check; anything else that differs loosens it.
            looser = given.lower() != found.lower() if found is not None else False
            if found is not None and flag == "--newer-than":
                looser = compare_versions(given, found) < 0
            if looser:
                notes.append(f"override: {flag} {given}, although {have.where} runs {what} {found}")
            return given
        if found is None and installed is not None:
            notes.append(f"{have.where} does not record its {what}: not checked (pass {flag} to check it)")
        return found

    app_id = pick("--app-id", o.app_id, have.app_id, "app id")
    arch = pick("--arch", o.arch, have.arch, "arch")
    current = pick("--newer-than", o.newer_than, have.version, "version")
    if o.allow_downgrade and current is not None:
        notes.append(f"override: --allow-downgrade, so a payload not newer than {current} is accepted")
    where = have.where if o.newer_than is None and o.app_id is None and o.arch is None else "the target"
    return Policy(app_id=app_id, arch=arch, current_version=current, allow_downgrade=o.allow_downgrade,
                  target=where, hint_overrides=True), notes


def load_keys(keys_dir: Path | None, extra: list[Path] | tuple[Path, ...] = ()) -> list[PublicKey]:
    """Every ``*.pub`` of ``keys_dir`` (sorted) and the ``extra`` key files, each checked to be a regular file
    first (a FIFO would block the read). Raises SigningError / InputFileError (one line each)."""
    paths = sorted(keys_dir.glob("*.pub")) if keys_dir is not None and keys_dir.is_dir() else []
    return [load_public_key(check_input(p, "public key")) for p in [*paths, *extra]]


def check_policy(m: Manifest, policy: Policy, slot_len: int) -> None:
    """Everything that can be decided from the signed manifest, before any write."""

    def hint(flag: str) -> str:
        return f" (pass {flag} to stage it anyway)" if policy.hint_overrides else ""

    if policy.app_id and m.app_id.lower() != policy.app_id.lower():
        raise ApplyError(f"payload is for app {m.app_id}, {policy.target} runs {policy.app_id}: wrong release"
                         + hint(f"--app-id {m.app_id}"), omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.arch and m.arch != policy.arch:
        raise ApplyError(f"payload is for arch {m.arch}, {policy.target} is {policy.arch}: wrong release"
                         + hint(f"--arch {m.arch}"), omaha.ERR_PAYLOAD_VERIFICATION)
    if policy.current_version and not policy.allow_downgrade:
        order = compare_versions(m.version, policy.current_version)
        if order <= 0:
            what = "the same version" if order == 0 else "older"
            raise ApplyError(f"payload version {m.version} is not newer than {policy.current_version}, which "
                             f"{policy.target} runs ({what}): refusing a downgrade" + hint("--allow-downgrade"),
                             omaha.ERR_PAYLOAD_VERIFICATION)
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
