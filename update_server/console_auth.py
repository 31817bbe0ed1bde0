"""Who is asking the web console: a bearer token, or a session cookie made at login from one.

Sessions are stateless: the cookie is `ROLE.NONCE.EXPIRES.MAC`, the MAC an HMAC-SHA256 under a key
derived from the token that logged in (never the token itself). Every replica given the same token
files accepts the same cookies, and changing a token ends its sessions. The cookie is HttpOnly,
SameSite=Strict, Path=/console (Secure over https). Each session has its CSRF token, an HMAC of its
nonce, put in every form and checked on every POST; a request with a bearer header needs none (a
cross-site form cannot send that header). The login form itself is double-submit: a random value in
a short-lived cookie and in the form must match.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from obelisk.errors import ObeliskError
from obelisk.serving import bearer_matches

COOKIE = "obelisk_console"
LOGIN_COOKIE = "obelisk_console_login"
PATH = "/console"
SESSION_TTL = 12 * 3600.0
LOGIN_TTL = 3600
_KEY_LABEL = b"obelisk console session v1"


class ConsoleAuthError(ObeliskError):
    """A console request is not allowed; `status` is the HTTP answer (401 unknown, 403 not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Session:
    admin: bool
    csrf: str      # "" for a bearer request: no form, no cookie, nothing to forge
    bearer: bool
    expires: float | None = None

    @property
    def role(self) -> str:
        return "admin" if self.admin else "read-only"


@dataclass(frozen=True)
class _Key:
    secret: bytes
    admin: bool


class ConsoleAuth:
    def __init__(self, read_tokens: list[str], admin_tokens: list[str], *, clock: Callable[[], float] = time.time,
                 ttl: float = SESSION_TTL) -> None:
        self.read_tokens, self.admin_tokens = list(read_tokens), list(admin_tokens)
        self.clock, self.ttl = clock, ttl
        self._keys = [_Key(_derive(t), True) for t in self.admin_tokens]
        self._keys += [_Key(_derive(t), False) for t in self.read_tokens if t not in self.admin_tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def role_of_token(self, token: str) -> bool | None:
        """True for an admin token, False for a read token, None for neither (compared in constant time)."""
        header = f"Bearer {token}"
        if any(bearer_matches(header, t) for t in self.admin_tokens):
            return True
        if any(bearer_matches(header, t) for t in self.read_tokens):
            return False
        return None

    # ---------------------------------------------------------------- sessions

    def new_cookie(self, token: str) -> tuple[str, Session]:
        admin = self.role_of_token(token)
        if admin is None:
            raise ConsoleAuthError(401, "wrong token")
        key = _derive(token)
        nonce = secrets.token_urlsafe(18)
        expires = int(self.clock() + self.ttl)
        payload = f"{'a' if admin else 'r'}.{nonce}.{expires}"
        return f"{payload}.{_mac(key, payload)}", Session(admin, _csrf(key, nonce), False, float(expires))

    def session(self, request: Request) -> Session | None:
        """The request's session: its bearer header when it sends one (right or wrong), else its cookie."""
        auth = request.headers.get("authorization")
        if auth is not None:
            token = auth.partition(" ")[2].strip() if auth.lower().startswith("bearer ") else ""
            admin = self.role_of_token(token) if token else None
            return None if admin is None else Session(admin, "", True)
        return self._from_cookie(request.cookies.get(COOKIE, ""))

    def _from_cookie(self, value: str) -> Session | None:
        parts = value.split(".")
        if len(parts) != 4 or parts[0] not in ("a", "r") or not parts[2].isdigit() or len(value) > 256:
            return None
        role, nonce, expires, mac = parts
        payload = f"{role}.{nonce}.{expires}"
        if int(expires) < self.clock():
            return None
        for k in self._keys:
            if k.admin == (role == "a") and hmac.compare_digest(_mac(k.secret, payload), mac):
                return Session(k.admin, _csrf(k.secret, nonce), False, float(expires))
        return None

    def require(self, request: Request, *, admin: bool = False) -> Session:
        s = self.session(request)
        if s is None:
            raise ConsoleAuthError(401, "log in first: this page needs a read or an admin token")
        if admin and not s.admin:
            raise ConsoleAuthError(403, "this change needs an admin token; you are logged in read-only")
        return s

    def check_csrf(self, request: Request, session: Session, form: dict[str, str]) -> None:
        """A POST from a session must carry the session's CSRF token and, if the browser names one, our origin."""
        origin = request.headers.get("origin")
        if origin is not None and origin != "null" and origin.partition("://")[2] != request.headers.get("host"):
            raise ConsoleAuthError(403, "cross-origin form refused")
        if session.bearer:
            return
        if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            raise ConsoleAuthError(403, "the form's CSRF token is missing or wrong: reload the page and try again")

    # ---------------------------------------------------------------- cookies

    def set_session_cookie(self, request: Request, response: Response, value: str) -> None:
        response.set_cookie(COOKIE, value, max_age=int(self.ttl), path=PATH, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    @staticmethod
    def clear_session_cookie(response: Response) -> None:
        response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict")

    @staticmethod
    def login_nonce(request: Request) -> str:
        """The login form's double-submit value: the one in the browser's login cookie, or a new one."""
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if 20 <= len(nonce) <= 64 and nonce.replace("-", "").replace("_", "").isalnum():
            return nonce
        return secrets.token_urlsafe(24)

    @staticmethod
    def set_login_cookie(request: Request, response: Response, nonce: str) -> None:
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=LOGIN_TTL, path=PATH + "/login", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    @staticmethod
    def check_login_nonce(request: Request, form: dict[str, str]) -> None:
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie.encode(), form.get("csrf", "").encode()):
            raise ConsoleAuthError(403, "the login form's CSRF token is missing or wrong: reload the login page")


def _derive(token: str) -> bytes:
    return hmac.new(token.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, payload: str) -> str:
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def _csrf(key: bytes, nonce: str) -> str:
    return hmac.new(key, b"csrf:" + nonce.encode(), hashlib.sha256).hexdigest()[:40]
