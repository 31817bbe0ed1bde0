"""etcd with TLS and client-certificate auth (certificates made by the test): the lock commands
work with --cafile/--certfile/--keyfile and fail with one clear line without them."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from update_engine.reboot.cli import app
from update_engine.reboot.etcd_local import LocalEtcd, Tls

pytestmark = pytest.mark.etcd


def _write(path: Path, key, cert) -> None:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_pki(d: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "obelisk test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(d / "ca", ca_key, ca)
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
        _write(d / name, key, cert)


def test_lock_over_tls_with_client_certs(tmp_path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    tls = Tls(ca=pki / "ca.pem", cert=pki / "server.pem", key=pki / "server.key")
    etcd = LocalEtcd(tmp_path / "etcd", 1, tls=tls, client_cert=(pki / "client.pem", pki / "client.key"))
    try:
        etcd.start()
        assert etcd.endpoints.startswith("https://")
        certs = ["--cafile", str(pki / "ca.pem"), "--certfile", str(pki / "client.pem"),
                 "--keyfile", str(pki / "client.key")]
        runner = CliRunner()
        r = runner.invoke(app, ["lock", "--id", "tls-host", "--endpoint", etcd.endpoints, *certs])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["status", "--json", "--endpoint", etcd.endpoints, *certs])
        assert '"tls-host"' in r.output
        # without a client certificate etcd refuses the TLS handshake: one line, exit 2
        r = runner.invoke(app, ["status", "--endpoint", etcd.endpoints, "--cafile", str(pki / "ca.pem")])
        assert r.exit_code == 2 and r.output.startswith("error: etcd unavailable") and len(r.output.splitlines()) == 1
        assert "client certificate" in r.output
        r = runner.invoke(app, ["status", "--endpoint", etcd.endpoints, "--cafile", str(tmp_path / "nope.pem")])
        assert r.exit_code == 2 and "CA file" in r.output and "missing or unreadable" in r.output
    finally:
        etcd.close()
