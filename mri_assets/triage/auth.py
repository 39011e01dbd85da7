"""Sessions, roles and CSRF for the triage app.

The session lives in a cookie signed by Starlette's SessionMiddleware (itsdangerous), HttpOnly
and SameSite=Strict. It holds the username, the role and the CSRF token; every POST must echo
the token (form field `csrf_token` or header `X-CSRF-Token`).
"""

from __future__ import annotations

import hmac
import secrets

from fastapi import HTTPException, Request

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"


class LoginRequired(Exception):
    """An anonymous request for a page: answered with a redirect to /login."""


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def check_csrf(request: Request, submitted: str | None) -> None:
    expected = request.session.get("csrf")
    if not expected or not submitted or not hmac.compare_digest(expected, submitted):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token; reload the page")


def log_in(request: Request, username: str, role: str) -> None:
    request.session.clear()
    request.session.update(user=username, role=role, csrf=secrets.token_urlsafe(32))


def log_out(request: Request) -> None:
    request.session.clear()


def api_user(request: Request) -> str:
    user = request.session.get("user")
    if not user:
        raise HTTPException(status_code=401, detail="log in first")
    return user


def page_user(request: Request) -> str:
    user = request.session.get("user")
    if not user:
        raise LoginRequired()
    return user


def page_admin(request: Request) -> str:
    user = page_user(request)
    if request.session.get("role") != "admin":
        raise HTTPException(status_code=403, detail="the admin page is for admins only")
    return user


def bearer_ok(request: Request, token: str | None) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given, token)
