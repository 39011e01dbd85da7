"""Logging in and out. The login form carries a double-submit CSRF token (`triage_login`
cookie); failed logins are throttled per account and per client (`label_store/throttle.py`),
and a locked login answers 429 with `Retry-After` without looking at the password."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from mri_assets.resources.label_store import new_session_token, token_hash
from mri_assets.triage import auth
from mri_assets.triage.context import Context, TriageContext

router = APIRouter()


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


@router.get("/login")
def login_page(
    request: Request, ctx: Context, notice: Annotated[str | None, Query(max_length=32)] = None
):
    message = auth.NOTICES.get(notice or "")
    return ctx.page(request, "login.html", notice=message, error=None)


def _logged_in(request: Request, ctx: TriageContext, user: str, now: datetime) -> Response:
    """A new session for `user`: its token in the session cookie, the login cookie dropped."""
    settings = ctx.settings
    token = new_session_token()
    ctx.label_store.create_session(
        user,
        token_hash(settings.secret_key, token),
        settings.session_max_age_s,
        client=client_of(request),
        user_agent=request.headers.get("user-agent", ""),
        now=now,
    )
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        auth.SESSION_COOKIE, token, max_age=settings.session_max_age_s,
        httponly=True, samesite="strict", secure=ctx.secure_cookies(request), path="/",
    )
    response.delete_cookie(auth.LOGIN_COOKIE, path="/login")
    return response


def _refused(
    request: Request, ctx: TriageContext, locked_until: datetime | None, now: datetime
) -> Response:
    """401 for a wrong login; 429 with `Retry-After` while the account or client is locked."""
    if locked_until is None:
        return ctx.page(request, "login.html", 401, notice=None,
                        error="Unknown user or wrong password.")
    wait_s = max(1, int((locked_until - now).total_seconds() + 0.999))
    error = (
        "Unknown user or wrong password. Too many failed logins for this account or from "
        f"this computer: try again after {locked_until:%H:%M:%S} UTC (in {wait_s} s)."
    )
    response = ctx.page(request, "login.html", 429, notice=None, error=error, locked=True)
    response.headers["Retry-After"] = str(wait_s)
    return response


@router.post("/login")
def login(
    request: Request,
    ctx: Context,
    username: Annotated[str, Form(max_length=256)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form(max_length=128)] = "",
):
    auth.check_login_csrf(request, csrf_token)
    store, client, now = ctx.label_store, client_of(request), ctx.clock()
    locked_until = store.login_locked_until(store.throttle_keys(username, client), now=now)
    if locked_until is None:
        user = store.authenticate(username, password)
        if user is not None:
            store.record_login_success(user)
            return _logged_in(request, ctx, user, now)
        locked_until = store.record_login_failure(
            username, client, ctx.settings.login_policy, now=now
        ).locked_until
    return _refused(request, ctx, locked_until, now)


@router.get("/logout")
def logout_page(request: Request, ctx: Context, user: str = Depends(auth.page_user)):
    return ctx.page(request, "logout.html")


@router.post("/logout")
def logout(
    request: Request,
    ctx: Context,
    csrf_token: Annotated[str, Form(max_length=128)] = "",
    user: str = Depends(auth.page_user),
):
    auth.check_csrf(request, csrf_token)
    ctx.label_store.end_session(auth.session_of(request).id, "logged_out", by=user, now=ctx.clock())
    response = RedirectResponse("/login?notice=logged_out", status_code=303)
    response.delete_cookie(auth.SESSION_COOKIE, path="/")
    return response
