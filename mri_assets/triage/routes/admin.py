"""The admin pages: the labeling loop at a glance, accounts, sessions, the audit log.

- `/admin`: queue, budget (with a burn-down plot of the current period), labels per class and
  per annotator by week, Cohen's kappa per pair of readers, cases flagged for missing pixels.
- `/admin/users`: add an account, change its role, disable/enable, reset its password, unlock
  it after failed logins, delete it. Every change but enable/unlock ends the account's sessions.
- `/admin/sessions`: open sessions (or all recent ones), and ending one.
- `/admin/audit`: the audit log filtered by actor, action and time, newest first, paged.

Every form posts the session's CSRF token; a refused change re-renders the page with the store's
message (never text from the URL).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse

from mri_assets.resources import label_store as store_errors
from mri_assets.resources.label_store import MAX_ITEM_ID, ROLES
from mri_assets.triage import auth
from mri_assets.triage.context import Context, TriageContext

DONE = {
    "added": "Account added.",
    "role": "Role changed; the account's sessions were ended.",
    "disable": "Account disabled; its sessions were ended.",
    "enable": "Account enabled.",
    "delete": "Account deleted; its sessions were ended.",
    "password": "Password reset; the account's sessions were ended.",
    "unlock": "Failed logins of the account forgotten.",
    "ended": "Session ended.",
    "requeued": "Flagged cases put back in the queue.",
}
PLOT_W, PLOT_H, PAD = 640, 220, 40
Username = Annotated[str, Form(min_length=1, max_length=256)]
Csrf = Annotated[str, Form(max_length=128)]
Admin = Annotated[str, Depends(auth.page_admin)]
router = APIRouter()


def burn_down_svg(burn: dict) -> dict:
    """Coordinates for the burn-down plot: € left per day against the even spend line."""
    start: date = burn["starts_on"]
    days = max(1, (burn["ends_on"] - start).days)
    cap = max(burn["cap_eur"], 0.01)

    def x(day: date) -> float:
        return PAD + (PLOT_W - 2 * PAD) * (day - start).days / days

    def y(eur: float) -> float:
        return PAD + (PLOT_H - 2 * PAD) * (1 - max(0.0, eur) / cap)

    actual = " ".join(f"{x(day):.1f},{y(eur):.1f}" for day, eur in burn["points"])
    return {
        "width": PLOT_W,
        "height": PLOT_H,
        "actual": actual,
        "ideal": f"{x(start):.1f},{y(cap):.1f} {x(burn['ends_on']):.1f},{y(0):.1f}",
        "x0": PAD,
        "x1": PLOT_W - PAD,
        "y0": PLOT_H - PAD,
        "y1": PAD,
        "cap_label": f"€{burn['cap_eur']:.2f}",
        "start_label": start.isoformat(),
        "end_label": burn["ends_on"].isoformat(),
    }


def _day(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.combine(date.fromisoformat(text), datetime.min.time())
    except ValueError:
        return None


def overview(request: Request, ctx: TriageContext, status_code: int = 200,
             error: str | None = None):
    store = ctx.label_store
    burn = store.burn_down()
    return ctx.page(
        request,
        "admin.html",
        status_code,
        stats=store.stats(),
        burn=burn,
        plot=burn_down_svg(burn),
        by_week=store.labels_by_week(),
        kappas=store.kappa_per_pair(),
        flagged=store.flagged_items(limit=100),
        error=error,
        done=DONE.get(request.query_params.get("done", "")),
    )


@router.get("/admin")
def admin_page(request: Request, ctx: Context, admin: Admin):
    return overview(request, ctx)


@router.post("/admin/flagged/requeue")
def requeue(
    request: Request,
    ctx: Context,
    admin: Admin,
    csrf_token: Csrf = "",
    item_id: Annotated[int | None, Form(ge=1, le=MAX_ITEM_ID)] = None,
):
    auth.check_csrf(request, csrf_token)
    ctx.label_store.requeue_flagged(None if item_id is None else [item_id], by=admin)
    return RedirectResponse("/admin?done=requeued", status_code=303)


def users_page(request: Request, ctx: TriageContext, status_code: int = 200,
               error: str | None = None):
    return ctx.page(
        request,
        "admin_users.html",
        status_code,
        users=ctx.label_store.annotators_list(),
        roles=ROLES,
        error=error,
        done=DONE.get(request.query_params.get("done", "")),
    )


@router.get("/admin/users")
def users(request: Request, ctx: Context, admin: Admin):
    return users_page(request, ctx)


def changed(request: Request, ctx: TriageContext, code: str, change: Callable[[], None]):
    """Apply an account change: back to the users page with `done=code`, or the page again
    with the store's refusal (404 unknown account, 409 conflict, 422 otherwise)."""
    try:
        change()
    except store_errors.LabelStoreError as error:
        status = 404 if isinstance(error, store_errors.UnknownAnnotator) else 409 if isinstance(
            error, store_errors.AnnotatorExists | store_errors.LastAdmin
        ) else 422
        return users_page(request, ctx, status, error=str(error))
    return RedirectResponse(f"/admin/users?done={code}", status_code=303)


@router.post("/admin/users/add")
def add_user(
    request: Request,
    ctx: Context,
    admin: Admin,
    username: Username,
    password: Annotated[str, Form(max_length=1024)],
    role: Annotated[Literal["clinician", "admin"], Form()] = "clinician",
    csrf_token: Csrf = "",
):
    auth.check_csrf(request, csrf_token)
    store = ctx.label_store
    return changed(request, ctx, "added",
                   lambda: store.add_annotator(username, password, role, by=admin))


@router.post("/admin/users/role")
def set_role(
    request: Request,
    ctx: Context,
    admin: Admin,
    username: Username,
    role: Annotated[Literal["clinician", "admin"], Form()],
    csrf_token: Csrf = "",
):
    auth.check_csrf(request, csrf_token)
    return changed(request, ctx, "role",
                   lambda: ctx.label_store.set_role(username, role, by=admin))


@router.post("/admin/users/password")
def reset_password(
    request: Request,
    ctx: Context,
    admin: Admin,
    username: Username,
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Csrf = "",
):
    auth.check_csrf(request, csrf_token)
    return changed(request, ctx, "password",
                   lambda: ctx.label_store.reset_password(username, password, by=admin))


@router.post("/admin/users/{action}")
def account_action(
    request: Request,
    ctx: Context,
    admin: Admin,
    action: Literal["disable", "enable", "delete", "unlock"],
    username: Username,
    csrf_token: Csrf = "",
):
    auth.check_csrf(request, csrf_token)
    store = ctx.label_store
    act = {
        "disable": store.disable_annotator,
        "enable": store.enable_annotator,
        "delete": store.delete_annotator,
        "unlock": store.unlock_annotator,
    }[action]
    return changed(request, ctx, action, lambda: act(username, by=admin))


@router.get("/admin/sessions")
def sessions_page(
    request: Request,
    ctx: Context,
    admin: Admin,
    all: Annotated[bool, Query()] = False,
):
    sessions = ctx.label_store.sessions_list(
        ctx.settings.session_idle_s, open_only=not all, now=ctx.clock()
    )
    return ctx.page(
        request,
        "admin_sessions.html",
        sessions=sessions,
        show_all=all,
        current=auth.session_of(request).id,
        done=DONE.get(request.query_params.get("done", "")),
    )


@router.post("/admin/sessions/end")
def end_session(
    request: Request,
    ctx: Context,
    admin: Admin,
    session_id: Annotated[int, Form(ge=1, le=MAX_ITEM_ID)],
    csrf_token: Csrf = "",
):
    auth.check_csrf(request, csrf_token)
    ctx.label_store.end_session(session_id, "ended_by_admin", by=admin, now=ctx.clock())
    return RedirectResponse("/admin/sessions?done=ended", status_code=303)


@router.get("/admin/audit")
def audit_page(
    request: Request,
    ctx: Context,
    admin: Admin,
    who: Annotated[str, Query(max_length=128)] = "",
    what: Annotated[str, Query(max_length=64)] = "",
    since: Annotated[str, Query(max_length=10)] = "",
    until: Annotated[str, Query(max_length=10)] = "",
    before: Annotated[int | None, Query(ge=1, le=MAX_ITEM_ID)] = None,
):
    until_day = _day(until)
    store = ctx.label_store
    entries = store.audit_entries(
        who=who or None,
        what=what or None,
        since=_day(since),
        until=None if until_day is None else until_day + timedelta(days=1),
        before_id=before,
        limit=100,
    )
    return ctx.page(
        request,
        "admin_audit.html",
        entries=entries,
        actions=store.audit_actions(),
        filters={"who": who, "what": what, "since": since, "until": until},
        next_before=entries[-1]["id"] if len(entries) == 100 else None,
    )
