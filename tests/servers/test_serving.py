"""obelisk/serving.py on its own: the HOST:PORT parser, the token-file reader, the bearer check, and
run_server's "cannot listen" error (a real uvicorn on a port the test holds)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from obelisk.serving import (
    ListenError,
    ServeError,
    TokenFileError,
    bearer_matches,
    parse_listen,
    read_token,
    run_server,
    shown_address,
)

GOOD = {"127.0.0.1:8080": ("127.0.0.1", 8080), "0.0.0.0:1": ("0.0.0.0", 1), "localhost:65535": ("localhost", 65535),
        "[::1]:8080": ("::1", 8080), "[::]:443": ("::", 443), "boot.example.net:80": ("boot.example.net", 80),
        "[fe80::1]:9": ("fe80::1", 9), "999.1.1.1:80": ("999.1.1.1", 80), "host_name:8": ("host_name", 8)}
BAD = {"nope": "no ':PORT'", "127.0.0.1": "no ':PORT'", "127.0.0.1:0": "not in 1-65535",
       "127.0.0.1:65536": "not in 1-65535", "127.0.0.1:99999": "not in 1-65535", "127.0.0.1:http": "not a number",
       "127.0.0.1:-1": "not a number", "127.0.0.1:+80": "not a number", "127.0.0.1: 80": "not a number",
       "127.0.0.1:8080\n": "not a number", "127.0.0.1:\u0668\u0660": "not a number", "127.0.0.1:": "no port after",
       ":8080": "no host", ":": "no host", "": "no ':PORT'", "[::1]": "no ':PORT'", "[::1]8080": "no ':PORT'",
       "[::1:8080": "no closing ']'", "[]:80": "is not an IPv6 address", "[1.2.3.4]:80": "is not an IPv6 address",
       "[::1]:": "no port after", "::1:8080": "in brackets", "a b:80": "not a host name",
       "h\n:80": "not a host name", "-lead:80": "not a host name", "h/x:80": "not a host name",
       "\u00e9t\u00e9:80": "not a host name", "x" * 300 + ":80": "not a host name", "h:80:90": "in brackets"}


@pytest.mark.parametrize(("text", "expected"), GOOD.items(), ids=list(GOOD))
def test_listen_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected
    assert parse_listen(shown_address(*expected)) == expected  # what the server prints reads back


@pytest.mark.parametrize(("text", "reason"), BAD.items(), ids=[repr(k)[:40] for k in BAD])
def test_bad_listen_addresses_are_one_clear_line(text: str, reason: str) -> None:
    with pytest.raises(ListenError) as exc:
        parse_listen(text, "--write-listen")
    msg = str(exc.value)
    assert msg.startswith("--write-listen ") and " is not HOST:PORT: " in msg and reason in msg, msg
    assert "\n" not in msg and len(msg) < 300 and "for example 127.0.0.1:8080 or [::1]:8080" in msg


def test_token_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good"
    good.write_text("  0123456789abcdef0123  \n")
    good.chmod(0o600)
    assert read_token(good, "admin token") == "0123456789abcdef0123"
    assert capsys.readouterr().err == ""
    good.chmod(0o644)
    read_token(good, "admin token")
    assert "can be read by other users; chmod 600 it" in capsys.readouterr().err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {"short": ("short\n", "at least 16 characters"), "two words": ("a" * 16 + " " + "b" * 16, "one word"),
             "tab inside": ("a" * 16 + "\t" + "b" * 16, "one word"), "empty": ("", "at least 16"),
             "control char": ("a" * 16 + "\x1b" + "b", "one word"), "not utf-8": (b"\xff" * 20, "cannot read")}
    for name, (content, needle) in cases.items():
        p = tmp_path / name.replace(" ", "_")
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(TokenFileError, match=needle):
            read_token(p, "admin token")
    for path, needle in ((fifo, "is a FIFO"), (tmp_path, "is a directory"), (tmp_path / "none", "no such")):
        with pytest.raises(TokenFileError) as exc:
            read_token(path, "write token")
        assert str(exc.value).startswith(f"cannot read the write token file {path}: ") and needle in str(exc.value)


@pytest.mark.parametrize(("header", "ok"), [
    ("Bearer 0123456789abcdef", True), ("bearer 0123456789abcdef", True), ("BEARER  0123456789abcdef ", True),
    ("Bearer 0123456789abcdeF", False), ("Bearer 0123456789abcde", False), ("Bearer 0123456789abcdef0", False),
    ("Basic 0123456789abcdef", False), ("0123456789abcdef", False), ("", False), ("Bearer", False),
    ("Bearer \u00e90123456789abcdef", False),
])
def test_bearer_check(header: str, ok: bool) -> None:
    assert bearer_matches(header, "0123456789abcdef") is ok


@pytest.mark.timeout(60)
def test_run_server_on_a_taken_port_raises_one_line() -> None:
    async def app(scope, receive, send) -> None:  # noqa: ANN001 - the smallest ASGI app
        raise AssertionError("never called")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError) as exc:
            run_server(app, "127.0.0.1", port, log_level="critical")
    assert str(exc.value) == f"cannot listen on 127.0.0.1:{port} (the reason is logged above)"
