"""Ed25519 keys and detached signatures (owner of the key file format).

Used by the payload manifest, ``SHA256SUMS.sig`` and ``obelisk key``. Keys are PEM files:
PKCS#8 for the private key (mode 0600), SubjectPublicKeyInfo for the public key. A host trusts
every ``*.pub`` in its keys directory, so keys can be rotated by shipping old and new together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from obelisk.atomicfile import write_atomic
from obelisk.errors import ObeliskError

PRIVATE_NAME = "obelisk.key"
PUBLIC_NAME = "obelisk.pub"
IMAGE_KEYS_DIR = "usr/share/obelisk/keys"  # relative to an OS tree root


class SigningError(ObeliskError, ValueError):
    """A key cannot be read or a signature does not verify; one line for the user."""


@dataclass(frozen=True)
class PublicKey:
    key: Ed25519PublicKey
    source: str

    @property
    def raw(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        """Short stable id: first 16 hex chars of SHA-256 of the raw key."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def generate_keypair(directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``obelisk.key`` (0600) and ``obelisk.pub`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise SigningError(f"{priv_path} already exists: choose another directory or remove the old key")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(priv_path, priv_pem, mode=0o600)
    write_atomic(pub_path, PublicKey(key.public_key(), str(pub_path)).pem())
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read signing key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(
            f"{path} is not an unencrypted PEM private key: make one with 'obelisk key generate DIR'"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 key: make one with 'obelisk key generate DIR'")
    return key


def load_public_key(path: Path) -> PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read public key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} is not an Ed25519 public key")
    return PublicKey(key, str(path))


def public_key_of(private: Ed25519PrivateKey) -> PublicKey:
    return PublicKey(private.public_key(), "private key")


def load_trusted_keys(directory: Path) -> list[PublicKey]:
    """Every ``*.pub`` in ``directory`` (sorted by name). Empty if there is none."""
    if not directory.is_dir():
        return []
    return [load_public_key(p) for p in sorted(directory.glob("*.pub"))]


def sign(private: Ed25519PrivateKey, data: bytes) -> bytes:
    return private.sign(data)


def verify_any(keys: list[PublicKey], data: bytes, signature: bytes) -> PublicKey:
    """Return the trusted key that made ``signature`` over ``data``, else raise SigningError."""
    if not keys:
        raise SigningError("no trusted public keys: install one under /usr/share/obelisk/keys or pass --key")
    if len(signature) != 64:
        raise SigningError(f"signature is {len(signature)} bytes, an Ed25519 signature is 64")
    for k in keys:
        try:
            k.key.verify(signature, data)
            return k
        except InvalidSignature:
            continue
    ids = ", ".join(k.key_id for k in keys)
    raise SigningError(f"signature was not made by any trusted key ({ids})")
