"""`obelisk key`: generate, sign, verify. Parse, call, print.

Hosts run ``obelisk key verify`` (the image test hook checks its run.sh with it), so the key
commands live on the ground floor, which every image carries, beside the signing they wrap.
"""

from __future__ import annotations

from pathlib import Path

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from obelisk import signing
from obelisk.atomicfile import write_atomic
from obelisk.errors import ObeliskError, clean_errors
from obelisk.inputs import check_input

TRUSTED_KEYS_DIR = Path("/") / signing.IMAGE_KEYS_DIR
key_app = typer.Typer(help="Manage Ed25519 signing keys.", no_args_is_help=True)


class KeyFileError(ObeliskError):
    """A key or signature file cannot be written (or read) where the user pointed."""


def read_input(path: Path, what: str) -> bytes:
    """The bytes of a user-named file, after check_input (a FIFO would hang the read)."""
    check_input(path, what)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def private_key(path: Path) -> Ed25519PrivateKey:
    check_input(path, "private key")
    return signing.load_private_key(path)


def public_key(path: Path) -> signing.PublicKey:
    check_input(path, "public key")
    return signing.load_public_key(path)


@key_app.command("generate")
def key_generate(
    directory: Path = typer.Argument(..., help="Where to write obelisk.key (0600) and obelisk.pub"),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair"),
) -> None:
    """Make a signing key pair: DIR/obelisk.key (private, 0600) and DIR/obelisk.pub."""
    with clean_errors():
        try:
            priv, pub = signing.generate_keypair(directory, overwrite=force)
        except OSError as exc:
            raise KeyFileError(f"{directory}: cannot write the key pair: {exc.strerror}: choose a folder you can "
                               "write") from None
    kid = signing.load_public_key(pub).key_id
    print(f"private key: {priv}\npublic key:  {pub}\nkey id:      {kid}")


@key_app.command("sign")
def key_sign(
    file: Path = typer.Argument(..., help="File to sign"),
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (obelisk.key)"),
    out: Path = typer.Option(None, "--out", help="Signature file (default: FILE.sig)"),
) -> None:
    """Write a detached Ed25519 signature of FILE (64 raw bytes, like SHA256SUMS.sig)."""
    with clean_errors():
        sig = signing.sign(private_key(key), read_input(file, "file to sign"))
        dest = out or file.with_name(file.name + ".sig")
        try:
            write_atomic(dest, sig)
        except OSError as exc:
            raise KeyFileError(f"{dest}: cannot write the signature: {exc.strerror}: pass --out PATH") from None
    print(f"signed {file} -> {dest}")


@key_app.command("verify")
def key_verify(
    file: Path = typer.Argument(..., help="Signed file"),
    sig: Path = typer.Argument(None, help="Signature file (default: FILE.sig)"),
    key: list[Path] = typer.Option(None, "--key", help="Trusted public key (repeatable; default: the image's keys)"),
) -> None:
    """Check a detached signature against the given keys or the image's trusted keys; exit 1 if it does not verify."""
    with clean_errors():
        keys = [public_key(k) for k in key] if key else signing.load_trusted_keys(TRUSTED_KEYS_DIR)
        data = read_input(file, "signed file")
        signature = read_input(sig or file.with_name(file.name + ".sig"), "signature")
    with clean_errors(signing.SigningError, code=1):
        signer = signing.verify_any(keys, data, signature)
    print(f"{file}: signed by {signer.key_id}")
