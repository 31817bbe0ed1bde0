"""etcd with TLS and client-certificate auth (certificates made by the test): the lock commands
work with --cafile/--certfile/--keyfile and fail with one clear line without them."""

from __future__ import annotations

from pathlib import Path

import pytest
from etcdlib import LocalEtcd, Tls
from testlib import make_pki
from typer.testing import CliRunner

from update_engine.reboot.cli import app

pytestmark = pytest.mark.etcd


def test_lock_over_tls_with_client_certs(tmp_path: Path) -> None:
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
