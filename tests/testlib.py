"""Helpers shared by test areas (import as `from testlib import ...`; conftest modules are not importable)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OBELISK = str(Path(sys.executable).with_name("obelisk"))


def need_tools(*tools: str) -> None:
    """Fail (not skip) when a system tool is missing: `make setup` installs them all."""
    missing = [t for t in tools if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
    if missing:
        pytest.fail(f"missing tools {missing}: run 'make setup'")


def say(config: pytest.Config | None, line: str) -> None:
    """Print past pytest's capture (boot times and the like belong in CI's output)."""
    capman = config.pluginmanager.getplugin("capturemanager") if config else None
    if capman is None:
        print(f"[vm] {line}")
        return
    with capman.global_and_fixture_disabled():
        sys.stdout.write(f"\n[vm] {line}\n")
        sys.stdout.flush()


def make_pki(d: Path) -> None:
    """A test CA and two certificates it signs, for 127.0.0.1: writes `ca`, `server` and `client`
    as `<name>.pem` (certificate) and `<name>.key` (PKCS#8 key) into ``d``."""
    # Imported here: most tests never make certificates.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "obelisk test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write(d / "ca", ca_key, ca)
    # etcd's JSON gateway dials etcd's own gRPC port with the server certificate as its client
    # certificate, so with client-cert auth the server certificate needs clientAuth too.
    server_usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for name, usage in (("server", server_usage), ("client", [ExtendedKeyUsageOID.CLIENT_AUTH])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
                .sign(ca_key, hashes.SHA256()))
        write(d / name, key, cert)


def stop_process(proc: subprocess.Popen, timeout: float = 5) -> None:
    """SIGTERM a server a test started, SIGKILL it if it does not stop in time; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
