"""The one HOST:PORT parser, bearer-token file reader and uvicorn runner of obelisk's servers.

`obelisk update serve`, `obelisk lock serve` and `obelisk provision serve` parse `--listen` the same
way, refuse the same bad addresses with the same one-line errors, and run under uvicorn with the
same settings: no proxy headers (uvicorn would believe X-Forwarded-For from any loopback client),
the asyncio loop, a bounded graceful shutdown, and "cannot listen" as one error line rather than
uvicorn's own exit. Ground floor: the standard library here, uvicorn imported when a server runs.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obelisk.errors import ObeliskError
from obelisk.inputs import InputFileError, check_input

# How long requests in flight may finish after SIGTERM. Unbounded, one idle HTTPS keep-alive client
# holds the exit for asyncio's 30 s TLS close_notify wait, and a slow download for its whole length.
GRACEFUL_SECONDS = 5
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
MIN_TOKEN = 16
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})")
_EXAMPLE = "for example 127.0.0.1:8080 or [::1]:8080"


class ListenError(ObeliskError):
    """A listen address that is not HOST:PORT; the message says what is wrong with it."""


class ServeError(ObeliskError):
    """A server that could not start listening (port taken, address not local, bad certificate)."""


class TokenFileError(ObeliskError):
    """A bearer-token file that cannot be read or holds no usable token."""


class BodyTooLarge(ObeliskError):
    """A request body over the endpoint's limit: the server answers 413 and closes the connection."""


def parse_listen(text: str, option: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); ListenError naming ``option`` and the reason."""

    def bad(why: str) -> ListenError:
        shown = text if len(text) <= 80 else text[:77] + "..."
        return ListenError(f"{option} {shown!r} is not HOST:PORT: {why} ({_EXAMPLE})")

    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close:
            raise bad("the IPv6 address has no closing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host[:64]!r} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise bad("no ':PORT' after the address")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise bad("no ':PORT'")
        if not host:
            raise bad("no host before ':' (0.0.0.0 listens on every IPv4 address)")
        if ":" in host:
            raise bad("an IPv6 address goes in brackets")
        if not _HOSTNAME.fullmatch(host):
            raise bad(f"{host[:64]!r} is not a host name or address")
    if not (port_text.isascii() and port_text.isdigit()):
        raise bad(f"the port {port_text[:16]!r} is not a number" if port_text else "no port after ':'")
    port = int(port_text)
    if not 0 < port < 65536:
        raise bad(f"the port {port} is not in 1-65535")
    return host, port


def shown_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_log_level(text: str) -> str:
    level = text.lower()
    if level not in LOG_LEVELS:
        raise ObeliskError(f"--log-level {text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def read_token(path: Path, what: str) -> str:
    """A bearer token from a file: one word of at least 16 characters; a warning when others may read it.

    ``what`` names the token in errors ("write token", "admin token").
    """
    try:
        check_input(path, f"{what} file")
        st = path.stat()
        token = path.read_text().strip()
    except InputFileError as exc:
        raise TokenFileError(f"cannot read the {what} file {path}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the {what} file {path}: {exc}") from None
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token) or not token.isprintable():
        raise TokenFileError(f"{path}: the {what} must be one word of at least {MIN_TOKEN} characters "
                             f"(make one with: head -c 32 /dev/urandom | base64 > {path})")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {path} can be read by other users; chmod 600 it", file=sys.stderr)
    return token


def bearer_matches(authorization: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a Starlette request, read chunk by chunk and given up on past ``limit`` bytes.

    ``await request.body()`` holds the whole body before anyone can look at its size (a 1 GB POST
    cost the server 3 GB); here a declared Content-Length over the limit is refused before a byte is
    read, and a chunked body as soon as it passes the limit. Raises BodyTooLarge. Answer it with
    ``Connection: close`` so uvicorn drops the rest instead of reading it.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > limit):
        raise BodyTooLarge(f"request body larger than {limit} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise BodyTooLarge(f"request body larger than {limit} bytes")
    return bytes(data)


@dataclass(frozen=True)
class Listener:
    """One more address the same app is served on. ``client_ca``: mutual TLS, only clients with a
    certificate from that CA get through the handshake (needs the server's certificate and key)."""

    host: str
    port: int
    client_ca: Path | None = None


def run_server(app: Any, host: str, port: int, *, log_level: str = "info", access_log: bool = True,
               ssl_certfile: Path | None = None, ssl_keyfile: Path | None = None,
               also: Sequence[Listener] = (), loggers: Sequence[str] = ()) -> None:
    """Serve ``app`` on host:port (and on each of ``also``) until SIGINT/SIGTERM.

    ``loggers``: the app's own loggers, written to stderr in uvicorn's "INFO:     ..." shape at
    ``log_level``. Raises ServeError when any listener cannot start; the others are then stopped.
    """
    import ssl

    import uvicorn

    tls: dict[str, Any] = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from loopback clients, and any
    # local process could claim an address an allow list lets in.
    # loop pinned to asyncio: uvloop, which uvicorn would pick when installed, made p99 several times worse.
    common: dict[str, Any] = {"log_level": log_level, "timeout_graceful_shutdown": GRACEFUL_SECONDS,
                              "proxy_headers": False, "access_log": access_log, "loop": "asyncio"}
    configs = [uvicorn.Config(app, host=host, port=port, **common, **tls)]
    for extra in also:
        mtls: dict[str, Any] = {}
        if extra.client_ca is not None:
            mtls = {"ssl_ca_certs": str(extra.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        configs.append(uvicorn.Config(app, host=extra.host, port=extra.port, **common, **tls, **mtls))
    _log_to_stderr(loggers, log_level)
    servers = [uvicorn.Server(c) for c in configs]
    try:
        with asyncio.Runner(loop_factory=configs[0].get_loop_factory()) as runner:
            failed = runner.run(_serve_all(servers))
    except ssl.SSLError as exc:  # an OSError too; uvicorn loads the certificate when it builds its SSL context
        raise ServeError(f"cannot use the TLS certificate or key: {exc}") from None
    except OSError as exc:
        raise ServeError(f"cannot listen: {exc}") from None
    if failed:
        where = ", ".join(shown_address(s.config.host, s.config.port) for s in failed)
        raise ServeError(f"cannot listen on {where} (the reason is logged above)")


def _log_to_stderr(names: Sequence[str], level: str) -> None:
    if not names:
        return
    from uvicorn.logging import DefaultFormatter  # the same "INFO:     ..." shape as uvicorn's own lines

    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=False))
    for name in names:
        log = logging.getLogger(name)
        log.addHandler(handler)
        log.setLevel(logging.DEBUG if level == "trace" else level.upper())
        log.propagate = False


async def _serve_all(servers: list[Any]) -> list[Any]:  # list[uvicorn.Server] -> the ones that could not start
    failed = []

    async def serve(server: Any) -> None:
        try:
            await server.serve()
        except SystemExit:
            # uvicorn's way of giving up at startup (port taken, bad certificate), after logging why.
            # Caught here: a SystemExit escaping a task would tear through the event loop.
            failed.append(server)

    tasks = [asyncio.create_task(serve(s)) for s in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for s in servers:  # one stopped (a signal, or it could not bind): stop the others too
        s.should_exit = True
    await asyncio.gather(*tasks)
    return failed
