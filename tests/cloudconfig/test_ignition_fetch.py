"""Remote configs and contents against a real HTTP(S) server on 127.0.0.1: merge/replace, hashes,
redirects, timeouts, size bounds, proxies, extra CAs. A failure never changes the root."""

from __future__ import annotations

import datetime
import gzip
import http.server
import ipaddress
import json
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_ignition_support import data_url, fresh_root, ign, serving, sha256, sha512, tree

from cloudconfig import ignition
from cloudconfig.ignition import Fetcher, FetchError, InvalidIgnition
from cloudconfig.rootfs import ConfigApplyError

pytestmark = pytest.mark.timeout(60)


def _file(path: str, body: str) -> dict:
    return {"path": path, "contents": {"source": data_url(body)}}


def test_merge_from_http_with_hash(tmp_path: Path) -> None:
    child = ign("3.2.0", storage={"files": [_file("/etc/child", "from child\n")]})
    with serving() as s, Fetcher(attempts=1) as f:
        url = s.add("/child.ign", child)
        parent = ign("3.4.0", ignition={"version": "3.4.0", "config": {"merge": [
            {"source": url, "verification": {"hash": sha512(child)}}]}},
            storage={"files": [_file("/etc/parent", "from parent\n")]})
        root = fresh_root(tmp_path)
        ignition.apply(parent, root, fetcher=f)
        hdrs = s.routes["/child.ign"].seen_headers[0]
    assert (root / "etc/child").read_text() == "from child\n"
    assert (root / "etc/parent").read_text() == "from parent\n"
    assert hdrs["Accept"].startswith("application/vnd.coreos.ignition+json")
    assert hdrs["Accept-Encoding"] == "identity"


def test_child_entries_override_the_parents(tmp_path: Path) -> None:
    child = ign(storage={"files": [{"path": "/etc/x", "mode": 384, "contents": {"source": data_url("child")}}]})
    with serving() as s, Fetcher(attempts=1) as f:
        url = s.add("/c.ign", child)
        parent = ign(ignition={"version": "3.4.0", "config": {"merge": [{"source": url}]}},
                     storage={"files": [{"path": "/etc/x", "mode": 420, "user": {"id": 1000},
                                         "contents": {"source": data_url("parent")}}]})
        root = fresh_root(tmp_path)
        ignition.apply(parent, root, fetcher=f)
    st = (root / "etc/x").stat()
    assert ((root / "etc/x").read_text(), st.st_mode & 0o777, st.st_uid) == ("child", 0o600, 1000)


def test_replace_drops_the_parents_contents(tmp_path: Path) -> None:
    new = ign("3.0.0", storage={"files": [_file("/etc/new", "replaced\n")]})
    with serving() as s, Fetcher(attempts=1) as f:
        url = s.add("/new.ign", new)
        parent = ign(ignition={"version": "3.4.0", "config": {"replace": {
            "source": url, "verification": {"hash": sha256(new)}}}},
            storage={"files": [_file("/etc/old", "x")]})
        root = fresh_root(tmp_path)
        ignition.apply(parent, root, fetcher=f)
    assert (root / "etc/new").read_text() == "replaced\n"
    assert not (root / "etc/old").exists()


def test_merge_chain_and_a_loop_is_bounded(tmp_path: Path) -> None:
    with serving() as s, Fetcher(attempts=1) as f:
        c = ign(storage={"files": [_file("/etc/c", "c")]})
        curl = s.add("/c.ign", c)
        b = ign(ignition={"version": "3.4.0", "config": {"merge": [{"source": curl}]}},
                storage={"files": [_file("/etc/b", "b")]})
        burl = s.add("/b.ign", b)
        root = fresh_root(tmp_path)
        ignition.apply(ign(ignition={"version": "3.4.0", "config": {"merge": [{"source": burl}]}}), root, fetcher=f)
        assert (root / "etc/b").read_text() == "b" and (root / "etc/c").read_text() == "c"
        loop_url = s.url("/loop.ign")
        s.add("/loop.ign", ign(ignition={"version": "3.4.0", "config": {"merge": [{"source": loop_url}]}}))
        root2 = fresh_root(tmp_path, "root2")
        before = tree(root2, skip_marker=False)
        with pytest.raises(ConfigApplyError, match="more than 8 levels deep"):
            ignition.apply(ign(ignition={"version": "3.4.0", "config": {"merge": [{"source": loop_url}]}}), root2,
                           fetcher=f)
        assert tree(root2, skip_marker=False) == before


@pytest.mark.parametrize("where", ["merge", "replace", "file"])
def test_hash_mismatch_is_refused_and_nothing_changes(tmp_path: Path, where: str) -> None:
    body = ign(storage={"files": [_file("/etc/child", "x")]})
    with serving() as s, Fetcher(attempts=1) as f:
        url = s.add("/x", body)
        ref = {"source": url, "verification": {"hash": sha512(b"something else")}}
        if where == "file":
            cfg = ign(storage={"files": [{"path": "/etc/f", "contents": ref}]})
        else:
            cfg = ign(ignition={"version": "3.4.0", "config": {where: [ref] if where == "merge" else ref}},
                      storage={"files": [_file("/etc/parent", "p")]})
        root = fresh_root(tmp_path)
        before = tree(root, skip_marker=False)
        with pytest.raises(FetchError, match="hash mismatch") as exc:
            ignition.apply(cfg, root, fetcher=f)
    assert "nothing was changed" in str(exc.value)
    assert tree(root, skip_marker=False) == before


def test_redirects_are_followed_and_bounded(tmp_path: Path) -> None:
    with serving() as s, Fetcher(attempts=1) as f:
        s.add("/final", b"final contents")
        for i in range(6):
            s.add(f"/r{i}", redirect=s.url(f"/r{i + 1}") if i < 5 else s.url("/final"))
        root = fresh_root(tmp_path)
        ignition.apply(ign(storage={"files": [{"path": "/etc/ok", "contents": {"source": s.url("/r3")}}]}), root,
                       fetcher=f)
        assert (root / "etc/ok").read_bytes() == b"final contents"
        root2 = fresh_root(tmp_path, "root2")
        with pytest.raises(FetchError, match="more than 5 redirects"):
            ignition.apply(ign(storage={"files": [{"path": "/etc/no", "contents": {"source": s.url("/r0")}}]}), root2,
                           fetcher=f)
        assert not (root2 / "etc/no").exists()


def test_a_redirect_to_another_scheme_is_refused(tmp_path: Path) -> None:
    with serving() as s, Fetcher(attempts=1) as f:
        s.add("/evil", redirect="file:///etc/shadow")
        with pytest.raises(FetchError, match="redirected to an unusable URL"):
            ignition.apply(ign(storage={"files": [{"path": "/etc/x", "contents": {"source": s.url("/evil")}}]}),
                           fresh_root(tmp_path), fetcher=f)


def test_timeout_from_the_config(tmp_path: Path) -> None:
    with serving() as s, Fetcher(attempts=1) as f:
        url = s.add("/slow.ign", ign(), delay=5)
        cfg = ign(ignition={"version": "3.4.0", "timeouts": {"httpResponseHeaders": 1},
                            "config": {"merge": [{"source": url}]}})
        start = time.monotonic()
        with pytest.raises(FetchError, match=r"no response within 1 s"):
            ignition.apply(cfg, fresh_root(tmp_path), fetcher=f)
    assert time.monotonic() - start < 4


def test_failures_worth_retrying_are_retried_then_reported(tmp_path: Path) -> None:
    slept: list[float] = []
    with serving() as s, Fetcher(attempts=3, sleep=slept.append) as f:
        url = s.add("/down", b"", status=503)
        with pytest.raises(FetchError, match=r"HTTP 503 .*after 3 attempt"):
            ignition.apply(ign(storage={"files": [{"path": "/etc/x", "contents": {"source": url}}]}),
                           fresh_root(tmp_path), fetcher=f)
        assert s.routes["/down"].hits == 3 and slept == [0.5, 1.0]
        s.add("/gone", b"", status=404)
        with pytest.raises(FetchError, match="HTTP 404"):
            ignition.apply(ign(storage={"files": [{"path": "/etc/x", "contents": {"source": s.url("/gone")}}]}),
                           fresh_root(tmp_path, "r2"), fetcher=f)
        assert s.routes["/gone"].hits == 1  # a 404 is not retried


def test_size_bounds_on_the_wire_and_after_gzip(tmp_path: Path) -> None:
    with serving() as s, Fetcher(attempts=1, limit=10_000) as f:
        big = s.add("/big", b"x" * 50_000)
        with pytest.raises(FetchError, match="more than the limit of 10000"):
            f.fetch(big)
        s.add("/nolength", b"y" * 50_000, length=False)  # only the stream's bound can stop it
        with pytest.raises(FetchError, match="more than the limit of 10000"):
            f.fetch(s.url("/nolength"))
        bomb = gzip.compress(b"\0" * 5_000_000)
        url = s.add("/bomb.gz", bomb)
        with pytest.raises(FetchError, match="inflates to more than 10000 bytes"):
            f.fetch(url, compression="gzip")
        with pytest.raises(FetchError, match="inflates to more than 10000 bytes"):
            f.fetch(data_url(bomb, b64=True), compression="gzip")


def test_http_contents_gzip_sha256_and_headers(tmp_path: Path) -> None:
    payload = b"#!/bin/sh\necho hello\n"
    with serving() as s, Fetcher(attempts=1) as f:
        url = s.add("/tool.gz", gzip.compress(payload))
        cfg = ign(storage={"files": [{"path": "/opt/bin/tool", "mode": 493, "contents": {
            "source": url, "compression": "gzip", "verification": {"hash": sha256(payload)},
            "httpHeaders": [{"name": "Authorization", "value": "Bearer t0k3n"}]}}]})
        root = fresh_root(tmp_path)
        ignition.apply(cfg, root, fetcher=f)
        seen = s.routes["/tool.gz"].seen_headers[0]
    assert (root / "opt/bin/tool").read_bytes() == payload
    assert (root / "opt/bin/tool").stat().st_mode & 0o777 == 0o755
    assert seen["Authorization"] == "Bearer t0k3n"


def test_an_invalid_fetched_config_is_reported_with_its_errors(tmp_path: Path) -> None:
    with serving() as s, Fetcher(attempts=1) as f:
        url = s.add("/bad.ign", b'{"ignition": {"version": "3.4.0"},\n "storage": {"files": [{"path": "rel"}]}}')
        old = s.add("/old.ign", json.dumps({"ignition": {"version": "2.2.0"}}).encode())
        with pytest.raises(InvalidIgnition, match=r"config from http://127.0.0.1:\d+/bad.ign has 1 error") as exc:
            ignition.apply(ign(ignition={"version": "3.4.0", "config": {"merge": [{"source": url}]}}),
                           fresh_root(tmp_path), fetcher=f)
        assert [e.text() for e in exc.value.report.entries] == [
            'line 2 column 33: error: /storage/files/0/path: path "rel" is not absolute']
        with pytest.raises(InvalidIgnition) as exc:
            ignition.apply(ign(ignition={"version": "3.4.0", "config": {"replace": {"source": old}}}),
                           fresh_root(tmp_path, "r2"), fetcher=f)
        assert "Ignition spec 2 configs" in exc.value.report.entries[0].message


def test_the_merged_result_is_checked_again(tmp_path: Path) -> None:
    """Each config is valid alone; merged, a file lies under a link (Ignition: "it is possible to merge
    two valid configs and get an invalid config")."""
    with serving() as s, Fetcher(attempts=1) as f:
        url = s.add("/c.ign", ign(storage={"links": [{"path": "/etc/app", "target": "/var/app"}]}))
        cfg = ign(ignition={"version": "3.4.0", "config": {"merge": [{"source": url}]}},
                  storage={"files": [_file("/etc/app/conf", "x")]})
        with pytest.raises(InvalidIgnition, match="merged config has 1 error") as exc:
            ignition.apply(cfg, fresh_root(tmp_path), fetcher=f)
    assert exc.value.report.entries[0].text() == (
        "error: /storage/files/0: merged config: file path includes link in config (/storage/links/0 makes "
        "/etc/app a link)")


def test_proxy_from_the_config_is_used(tmp_path: Path) -> None:
    with serving() as proxy, Fetcher(attempts=1) as f:
        proxy.add("http://example.invalid/f", b"via proxy")  # a proxy sees the absolute URL
        cfg = ign(ignition={"version": "3.4.0", "proxy": {"httpProxy": proxy.url("")}},
                  storage={"files": [{"path": "/etc/p", "contents": {"source": "http://example.invalid/f"}}]})
        root = fresh_root(tmp_path)
        ignition.apply(cfg, root, fetcher=f)
    assert (root / "etc/p").read_bytes() == b"via proxy"


def _self_signed(tmp: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp / "cert.pem").write_bytes(pem)
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return tmp / "cert.pem", tmp / "key.pem", pem


def test_https_with_a_certificate_authority_from_the_config(tmp_path: Path) -> None:
    cert, key, pem = _self_signed(tmp_path)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = b"secret over tls"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        url = f"https://127.0.0.1:{httpd.server_address[1]}/f"
        files = {"files": [{"path": "/etc/tls", "contents": {"source": url}}]}
        with Fetcher(attempts=1) as f, pytest.raises(FetchError, match="TLS verification failed"):
            ignition.apply(ign(storage=files), fresh_root(tmp_path, "r1"), fetcher=f)
        root = fresh_root(tmp_path, "r2")
        with Fetcher(attempts=1) as f:
            ignition.apply(ign(ignition={"version": "3.4.0", "security": {"tls": {"certificateAuthorities": [
                {"source": data_url(pem), "verification": {"hash": sha512(pem)}}]}}}, storage=files), root,
                fetcher=f)
        assert (root / "etc/tls").read_bytes() == b"secret over tls"
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=5)


def test_no_read_timeout_still_ends_at_the_total_deadline(tmp_path: Path) -> None:
    """httpResponseHeaders: 0 means no per-read timeout; httpTotal still bounds the wait for headers."""
    with serving() as s, Fetcher(attempts=1) as f:
        url = s.add("/slow", b"x", delay=6)
        cfg = ign(ignition={"version": "3.4.0", "timeouts": {"httpResponseHeaders": 0, "httpTotal": 1}},
                  storage={"files": [{"path": "/etc/x", "contents": {"source": url}}]})
        start = time.monotonic()
        with pytest.raises(FetchError, match=r"no response within 1 s \(ignition.timeouts.httpTotal\)"):
            ignition.apply(cfg, fresh_root(tmp_path), fetcher=f)
    assert time.monotonic() - start < 4
