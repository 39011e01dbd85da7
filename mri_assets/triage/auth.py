"""Sessions, roles and CSRF for the triage app.

The session lives in the label store (`sessions` table, see `label_store/sessions.py`). The
browser holds only a random token in the `triage_session` cookie (HttpOnly, SameSite=Strict,
`Secure` when configured); the store keeps its HMAC under the app's secret. `SessionGate` looks
the session up before any route runs — before a request body is read — and refuses anonymous,
ended, idle or expired sessions: API and image paths with 401 JSON, pages with a redirect to
`/login?notice=<why>`. The user's role is read from the account on every request.

CSRF: every state-changing request must echo the session's token (form field `csrf_token` or
header `X-CSRF-Token`); before login, the login form echoes a token from the `triage_login`
cookie (double submit). Tokens are compared as bytes, so any header text is merely wrong.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Callable
from urllib.parse import urlencode

import anyio
from fastapi import HTTPException, Request
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from mri_assets.resources.label_store import SessionInfo
from mri_assets.triage.security import header, send_json

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SESSION_COOKIE = "triage_session"
LOGIN_COOKIE = "triage_login"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")
PUBLIC_PATHS = ("/login", "/metrics")
PUBLIC_PREFIXES = ("/static/",)
API_PREFIXES = ("/api/", "/image/")
# Background calls of the page that must not count as a clinician's activity.
QUIET_PATHS = ("/api/renew", "/api/progress")
NOTICES = {
    "idle": "Your session ended after a while without activity. Please log in again.",
    "expired": "Your session reached its maximum length. Please log in again.",
    "revoked": "Your session was ended (by an administrator or an account change). "
    "Please log in again.",
    "logged_out": "You are logged out.",
    "ended": "Your session has ended. Please log in again.",
}
_NOTICE_OF_REASON = {
    "idle": "idle",
    "expired": "expired",
    "revoked": "revoked",
    "ended_by_admin": "revoked",
    "logged_out": "logged_out",
    "unknown": "ended",
}


def valid_token(token: str | None) -> bool:
    return bool(token) and _TOKEN.match(token) is not None


def tokens_equal(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of two tokens of any text (compared as UTF-8 bytes)."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8", "replace"), given.encode("utf-8", "replace"))


def session_of(request: Request) -> SessionInfo:
    session = request.scope.get("triage_session")
    if session is None:  # only reachable when a route is wrongly left public
        raise HTTPException(status_code=401, detail="log in first")
    return session


def api_user(request: Request) -> str:
    return session_of(request).username


def page_user(request: Request) -> str:
    return session_of(request).username


def page_admin(request: Request) -> str:
    session = session_of(request)
    if session.role != "admin":
        raise HTTPException(status_code=403, detail="the admin pages are for admins only")
    return session.username


def check_csrf(request: Request, submitted: str | None) -> None:
    session = request.scope.get("triage_session")
    if session is None or not tokens_equal(session.csrf, submitted):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token; reload the page")


def login_csrf(request: Request) -> tuple[str, bool]:
    """(the login form's token, whether the cookie must be set now)."""
    token = request.cookies.get(LOGIN_COOKIE)
    if valid_token(token):
        return token, False
    return secrets.token_urlsafe(32), True


def check_login_csrf(request: Request, submitted: str | None) -> None:
    if not tokens_equal(request.cookies.get(LOGIN_COOKIE), submitted):
        raise HTTPException(
            status_code=403, detail="missing or wrong CSRF token; reload the login page"
        )


def bearer_ok(request: Request, token: str | None) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and tokens_equal(token, given)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class SessionGate:
    """Resolves `triage_session` into `scope["triage_session"]` or refuses the request.

    `resolve(token, touch) -> (SessionInfo | None, reason)` is called in a worker thread.
    """

    def __init__(
        self,
        app: ASGIApp,
        resolve: Callable[[str, bool], tuple[SessionInfo | None, str | None]],
        cookie_secure: bool,
    ):
        self.app = app
        self.resolve = resolve
        self.cookie_secure = cookie_secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = cookie_parser(header(scope, b"cookie") or "").get(SESSION_COOKIE)
        session, reason = None, None
        if valid_token(token):
            touch = scope["path"] not in QUIET_PATHS
            session, reason = await anyio.to_thread.run_sync(self.resolve, token, touch)
        if session is not None:
            scope["triage_session"] = session
            await self.app(scope, receive, send)
            return
        notice = _NOTICE_OF_REASON.get(reason or "", "ended") if token else None
        clear = (
            [(b"set-cookie", f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; "
                             f"SameSite=strict{'; Secure' if self.cookie_secure else ''}".encode())]
            if token
            else []
        )
        if scope["path"].startswith(API_PREFIXES):
            await send_json(
                send,
                401,
                {
                    "error": "LoginRequired",
                    "detail": NOTICES[notice] if notice else "log in first",
                    "login_url": "/login" + (f"?{urlencode({'notice': notice})}" if notice else ""),
                },
                [(b"www-authenticate", b"Cookie")],  # the page's next load clears it
            )
            return
        location = "/login" + (f"?{urlencode({'notice': notice})}" if notice else "")
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [(b"location", location.encode()), (b"content-length", b"0"), *clear],
            }
        )
        await send({"type": "http.response.body", "body": b""})
