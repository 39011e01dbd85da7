"""The clinicians' triage web app: log in, label leased slices with the keyboard, admin pages.

`create_app(label_store, load_slice_png, settings)` builds the FastAPI app; `serve(deployment,
host, port)` runs it with uvicorn over the deployment's label store and object store.

Every route except /login, /static and /metrics needs a live server-side session (`auth.py`):
pages redirect to /login, API and image routes answer 401, the /admin pages answer 403 to
non-admins, and /metrics needs `Authorization: Bearer <metrics_token>` (with no token configured
/metrics always answers 401). Request guards (`security.py`): bodies over `max_body_bytes` get
413 before any parsing, cross-site state-changing requests 403, and every answer carries the
security headers. Every input that the routes take is bounded and validated, so a bad one gets a
4xx answer. The app refuses to start with a weak or default secret unless `demo` is set.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated

import jinja2
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from mri_assets.deployment import Deployment
from mri_assets.resources import label_store as store_errors
from mri_assets.resources.label_store import (
    MAX_HELD,
    MAX_ITEM_ID,
    LabelStore,
    LoginPolicy,
    new_session_token,
    token_hash,
    utc_now,
)
from mri_assets.triage import auth
from mri_assets.triage.admin import add_admin_routes
from mri_assets.triage.classes import DEFINITIONS
from mri_assets.triage.raw_slices import RawSlice, RawSliceReader
from mri_assets.triage.security import BodyLimit, OriginCheck, SecurityHeaders, check_secret
from mri_assets.triage.slice_reader import SliceReader

HERE = Path(__file__).parent
log = logging.getLogger(__name__)

_ERROR_STATUS = {
    store_errors.UnknownItem: 404,
    store_errors.UnknownAnnotator: 404,
    store_errors.LabelNotInClassSet: 422,
    store_errors.WeakPassword: 422,
    store_errors.InvalidUsername: 422,
    store_errors.ItemLeasedToOther: 409,
    store_errors.LeaseLost: 409,
    store_errors.ItemClosed: 409,
    store_errors.BudgetExhausted: 409,
    store_errors.CannotUndo: 409,
    store_errors.AnnotatorExists: 409,
    store_errors.LastAdmin: 409,
    store_errors.LabelStoreError: 400,
}
ItemId = Annotated[int, Field(ge=1, le=MAX_ITEM_ID, strict=True)]


class WeakSecret(ValueError):
    """The session secret is weak or a default: the app does not start with it."""


@dataclass(frozen=True)
class TriageSettings:
    secret_key: str
    metrics_token: str | None = None
    show_prediction: bool = False
    lease_seconds: int = 300
    session_max_age_s: int = 8 * 3600
    session_idle_s: int = 30 * 60
    session_touch_s: float = 60.0
    cookie_secure: bool = False
    demo: bool = False
    max_body_bytes: int = 64 * 1024
    allowed_origins: tuple[str, ...] = ()
    login_policy: LoginPolicy = field(default_factory=LoginPolicy)

    @classmethod
    def from_deployment(cls, deployment: Deployment) -> TriageSettings:
        """The settings of the deployment's triage server (MRI_ASSETS_TRIAGE_*)."""
        triage = deployment.triage
        secret = triage.secret.value if triage.secret else ""
        if not secret and triage.demo:
            log.warning(
                "demo mode and MRI_ASSETS_TRIAGE_SECRET is not set: using a random session "
                "secret, so clinicians must log in again after a restart"
            )
            secret = secrets.token_urlsafe(32)
        return cls(
            secret_key=secret,
            metrics_token=triage.metrics_token.value if triage.metrics_token else None,
            show_prediction=triage.show_prediction,
            lease_seconds=triage.lease_seconds,
            session_idle_s=triage.idle_seconds,
            cookie_secure=triage.cookie_secure,
            demo=triage.demo,
            allowed_origins=triage.allowed_origins,
        )


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemAction(_Body):
    item_id: ItemId


class ItemActionThenNext(ItemAction):
    lease_next_held: list[ItemId] | None = Field(default=None, max_length=MAX_HELD)


class LabelSubmission(ItemActionThenNext):
    label: str = Field(min_length=1, max_length=128)
    seconds_spent: float = Field(default=0.0, ge=0, le=86_400, allow_inf_nan=False)


class LeaseRenewal(_Body):
    item_ids: list[ItemId] = Field(max_length=MAX_HELD)


def _templates() -> Jinja2Templates:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True
    )
    return Jinja2Templates(env=environment)


def _metrics_text(stats: dict) -> str:
    gauges = {
        "mri_triage_queue_size": ("Items queued or leased", stats["queue_size"]),
        "mri_triage_labels_last_hour": (
            "Labels submitted in the last hour",
            stats["labels_last_hour"],
        ),
        "mri_triage_labels_total": ("Labels in the store", stats["labels_total"]),
        "mri_triage_budget_left_cases": (
            "Expert cases the budget still pays for",
            stats["budget_left_cases"],
        ),
        "mri_triage_budget_left_eur": ("Labeling budget left in EUR", stats["budget_left_eur"]),
    }
    lines = []
    for name, (help_text, value) in gauges.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {float(value)}"]
    return "\n".join(lines) + "\n"


def _item_payload(item: dict, show_prediction: bool, now: datetime, raw: bool = False) -> dict:
    expires = item["lease_expires_at"]
    payload = {
        "id": item["id"],
        "wave": item["wave"],
        "kind": item["kind"],
        "class_set": item["class_set"],
        "image_url": f"/image/{item['id']}.png",
        "raw_url": f"/image/{item['id']}.raw" if raw else None,
        "lease_expires_at": expires.isoformat() + "Z",
        "lease_seconds_left": max(0.0, round((expires - now).total_seconds(), 1)),
    }
    if show_prediction:
        payload["prediction"] = item["prediction"]
    return payload


def _parse_held(held: str) -> list[int]:
    parts = [part for part in held.split(",") if part]
    if len(parts) > MAX_HELD:
        raise HTTPException(422, f"held lists at most {MAX_HELD} item ids")
    ids = [int(part) for part in parts]  # the query pattern allows digits only
    if any(not 1 <= i <= MAX_ITEM_ID for i in ids):
        raise HTTPException(422, f"held item ids are 1..{MAX_ITEM_ID}")
    return ids


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def create_app(
    label_store: LabelStore,
    load_slice_png: Callable[[str, str], bytes],
    settings: TriageSettings,
    clock: Callable[[], datetime] = utc_now,
    load_raw_slice: Callable[[str, str], RawSlice] | None = None,
) -> FastAPI:
    """The triage app over `label_store`; `load_slice_png(wave, image_id)` gives PNG bytes.

    `load_raw_slice(wave, image_id)` gives the slice at its original resolution and values
    for the viewer (default: read from the raw objects of `load_slice_png`'s store when it is a
    `SliceReader`); the 256 px PNG stays the fallback. Raises WeakSecret when
    `settings.secret_key` is weak or a default and `settings.demo` is off. `clock` gives
    naive-UTC now for sessions (tests move it to end sessions)."""
    if load_raw_slice is None and isinstance(load_slice_png, SliceReader):
        load_raw_slice = RawSliceReader(load_slice_png.store)
    weakness = check_secret(settings.secret_key)
    if weakness is not None and not settings.demo:
        raise WeakSecret(
            f"the triage session secret is too weak ({weakness}): set MRI_ASSETS_TRIAGE_SECRET "
            "to at least 32 random characters, e.g. the output of `python -c \"import secrets; "
            "print(secrets.token_urlsafe(32))\"` (or MRI_ASSETS_TRIAGE_DEMO=1 for a demo)"
        )
    if weakness is not None:
        log.warning("demo mode: the triage session secret is weak (%s)", weakness)
    secret = settings.secret_key

    app = FastAPI(title="mri_assets triage", docs_url=None, redoc_url=None, openapi_url=None)
    raw_enabled = load_raw_slice is not None

    def resolve(token: str, touch: bool):
        return label_store.session_for(
            token_hash(secret, token),
            idle_s=settings.session_idle_s,
            touch_after_s=settings.session_touch_s,
            touch=touch,
            now=clock(),
        )

    # add_middleware: the last one added runs first.
    app.add_middleware(auth.SessionGate, resolve=resolve, cookie_secure=settings.cookie_secure)
    app.add_middleware(OriginCheck, allowed_origins=settings.allowed_origins)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders, hsts=settings.cookie_secure)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = _templates()

    @app.exception_handler(store_errors.LabelStoreError)
    async def refused(_request: Request, error: store_errors.LabelStoreError):
        status = next(code for cls, code in _ERROR_STATUS.items() if isinstance(error, cls))
        body = {"error": type(error).__name__, "detail": str(error)}
        if isinstance(error, store_errors.BudgetExhausted) and error.resumes_on is not None:
            body["resumes_on"] = error.resumes_on.isoformat()
        return JSONResponse(body, status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError):
        problems = [
            {"loc": [str(part) for part in e.get("loc", ())][:6], "msg": str(e.get("msg"))[:200]}
            for e in error.errors()[:20]
        ]
        return JSONResponse({"error": "InvalidRequest", "detail": problems}, 422)

    def page(request: Request, name: str, status_code: int = 200, **context) -> Response:
        session = request.scope.get("triage_session")
        new_login_token = None
        if session is not None:
            csrf = session.csrf
        else:
            csrf, fresh = auth.login_csrf(request)
            new_login_token = csrf if fresh else None
        context.update(
            user=session.username if session else None,
            role=session.role if session else None,
            csrf_token=csrf,
        )
        response = templates.TemplateResponse(request, name, context, status_code=status_code)
        if new_login_token:
            response.set_cookie(
                auth.LOGIN_COOKIE, new_login_token, max_age=3600, httponly=True,
                samesite="strict", secure=settings.cookie_secure or request.url.scheme == "https", path="/login",
            )
        return response

    # -- login and logout -------------------------------------------------------------------

    @app.get("/login")
    def login_page(
        request: Request, notice: Annotated[str | None, Query(max_length=32)] = None
    ):
        message = auth.NOTICES.get(notice or "")
        return page(request, "login.html", notice=message, error=None)

    @app.post("/login")
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=256)],
        password: Annotated[str, Form(max_length=1024)],
        csrf_token: Annotated[str, Form(max_length=128)] = "",
    ):
        auth.check_login_csrf(request, csrf_token)
        client = _client(request)
        policy = settings.login_policy
        now = clock()
        locked_until = label_store.login_locked_until(
            label_store.throttle_keys(username, client), now=now
        )
        if locked_until is None:
            user = label_store.authenticate(username, password)
            if user is not None:
                label_store.record_login_success(user)
                token = new_session_token()
                label_store.create_session(
                    user,
                    token_hash(secret, token),
                    settings.session_max_age_s,
                    client=client,
                    user_agent=request.headers.get("user-agent", ""),
                    now=now,
                )
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(
                    auth.SESSION_COOKIE, token, max_age=settings.session_max_age_s,
                    httponly=True, samesite="strict", secure=settings.cookie_secure or request.url.scheme == "https", path="/",
                )
                response.delete_cookie(auth.LOGIN_COOKIE, path="/login")
                return response
            locked_until = label_store.record_login_failure(
                username, client, policy, now=now
            ).locked_until
        if locked_until is None:
            return page(request, "login.html", 401, notice=None,
                        error="Unknown user or wrong password.")
        wait_s = max(1, int((locked_until - now).total_seconds() + 0.999))
        error = (
            "Unknown user or wrong password. Too many failed logins for this account or from "
            f"this computer: try again after {locked_until:%H:%M:%S} UTC (in {wait_s} s)."
        )
        response = page(request, "login.html", 429, notice=None, error=error, locked=True)
        response.headers["Retry-After"] = str(wait_s)
        return response

    @app.get("/logout")
    def logout_page(request: Request, user: str = Depends(auth.page_user)):
        return page(request, "logout.html")

    @app.post("/logout")
    def logout(
        request: Request,
        csrf_token: Annotated[str, Form(max_length=128)] = "",
        user: str = Depends(auth.page_user),
    ):
        auth.check_csrf(request, csrf_token)
        label_store.end_session(auth.session_of(request).id, "logged_out", by=user, now=clock())
        response = RedirectResponse("/login?notice=logged_out", status_code=303)
        response.delete_cookie(auth.SESSION_COOKIE, path="/")
        return response

    # -- labeling ---------------------------------------------------------------------------

    @app.get("/")
    def labeling_page(request: Request, user: str = Depends(auth.page_user)):
        return page(
            request,
            "label.html",
            show_prediction=settings.show_prediction,
            lease_seconds=settings.lease_seconds,
            definitions=DEFINITIONS,
        )

    def next_answer(user: str, held: list[int]) -> dict:
        item = label_store.lease_next(user, settings.lease_seconds, held=held)
        if item is None:
            return {"item": None, **label_store.queue_status()}
        return {"item": _item_payload(item, settings.show_prediction, utc_now(), raw_enabled)}

    @app.get("/api/next")
    def next_item(
        held: Annotated[str, Query(max_length=1024, pattern=r"^[0-9,]*$")] = "",
        user: str = Depends(auth.api_user),
    ):
        return next_answer(user, _parse_held(held))

    def checked(request: Request) -> None:
        auth.check_csrf(request, request.headers.get(auth.CSRF_HEADER))

    def answer_then_next(user: str, body: ItemActionThenNext, **answer) -> dict:
        """With `lease_next_held` the answer also carries the next item (one round trip)."""
        if body.lease_next_held is not None:
            upcoming = next_answer(user, body.lease_next_held)
            answer["next"] = upcoming.pop("item")
            answer.update(upcoming)
        return {"ok": True, **answer}

    @app.post("/api/label")
    def post_label(request: Request, body: LabelSubmission, user: str = Depends(auth.api_user)):
        checked(request)
        try:
            label_id = label_store.submit_label(
                body.item_id, user, body.label, body.seconds_spent
            )
        except store_errors.BudgetExhausted:
            try:
                label_store.release(body.item_id, user)
            except store_errors.LabelStoreError:
                pass
            raise
        return answer_then_next(user, body, label_id=label_id)

    @app.post("/api/skip")
    def post_skip(request: Request, body: ItemActionThenNext, user: str = Depends(auth.api_user)):
        checked(request)
        label_store.skip(body.item_id, user)
        return answer_then_next(user, body)

    @app.post("/api/unsure")
    def post_unsure(request: Request, body: ItemActionThenNext, user: str = Depends(auth.api_user)):
        checked(request)
        label_store.mark_unsure(body.item_id, user)
        return answer_then_next(user, body)

    @app.post("/api/undo")
    def post_undo(request: Request, body: ItemAction, user: str = Depends(auth.api_user)):
        checked(request)
        item = label_store.undo(body.item_id, user)
        return {"ok": True, "item": _item_payload(item, settings.show_prediction, utc_now(), raw_enabled)}

    @app.post("/api/renew")
    def post_renew(request: Request, body: LeaseRenewal, user: str = Depends(auth.api_user)):
        checked(request)
        renewed = label_store.renew_leases(user, body.item_ids, settings.lease_seconds)
        return {
            "renewed": {str(i): at.isoformat() + "Z" for i, at in renewed.items()},
            "lost": [i for i in body.item_ids if i not in renewed],
            "lease_seconds": settings.lease_seconds,
        }

    @app.get("/api/progress")
    def progress(request: Request, user: str = Depends(auth.api_user)):
        session = auth.session_of(request)
        return label_store.progress(user, since=session.created_at)

    @app.get("/image/{item_id}.png")
    def item_image(
        request: Request,
        item_id: Annotated[int, PathParam(ge=1, le=MAX_ITEM_ID)],
        user: str = Depends(auth.api_user),
    ):
        item = label_store.item(item_id)
        may_see = item is not None and (
            item["lease_owner"] == user or auth.session_of(request).role == "admin"
        )
        if not may_see:
            raise HTTPException(404, f"no item {item_id} leased to you")
        if item["flag"] is not None:
            return _missing_pixels(item_id, "it is flagged as having no readable pixels")
        try:
            png = load_slice_png(item["wave"], item["image_id"])
        except (LookupError, OSError, ValueError) as error:
            log.warning("item %s (%s/%s): no pixels: %s", item_id, item["wave"],
                        item["image_id"], error)
            label_store.flag_missing_pixels(item_id, by=user)
            return _missing_pixels(item_id, "its pixels cannot be read")
        return Response(png, media_type="image/png")

    @app.get("/api/example.png")
    def class_example(
        label: Annotated[str, Query(min_length=1, max_length=128)],
        user: str = Depends(auth.api_user),
    ):
        """The slice of the latest expert label of class `label`: its example beside the
        class definition (an image clinicians have labelled already, never a new case)."""
        example = label_store.example_of(label)
        if example is None:
            raise HTTPException(404, f"no expert label {label!r} yet")
        try:
            png = load_slice_png(*example)
        except (LookupError, OSError, ValueError) as error:
            raise HTTPException(404, "the example's pixels cannot be read") from error
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    @app.get("/image/{item_id}.raw")
    def item_raw_slice(
        request: Request,
        item_id: Annotated[int, PathParam(ge=1, le=MAX_ITEM_ID)],
        user: str = Depends(auth.api_user),
    ):
        item = label_store.item(item_id)
        may_see = item is not None and (
            item["lease_owner"] == user or auth.session_of(request).role == "admin"
        )
        if not may_see:
            raise HTTPException(404, f"no item {item_id} leased to you")
        if load_raw_slice is None:
            raise HTTPException(404, "this server reads no raw objects: use the PNG")
        try:
            body, headers = load_raw_slice(item["wave"], item["image_id"]).encode()
        except (LookupError, OSError, ValueError) as error:
            return JSONResponse({"error": "NoRawSlice", "detail": str(error)[:300]}, 404)
        return Response(body, media_type="application/octet-stream", headers=headers)

    def _missing_pixels(item_id: int, why: str) -> JSONResponse:
        return JSONResponse(
            {
                "error": "MissingPixels",
                "detail": f"case {item_id} cannot be shown: {why}. It is flagged for the admin "
                "and skipped for everyone.",
            },
            404,
        )

    @app.get("/metrics")
    def metrics(request: Request):
        if not auth.bearer_ok(request, settings.metrics_token):
            return PlainTextResponse(
                "metrics need 'Authorization: Bearer <MRI_ASSETS_METRICS_TOKEN>'\n",
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return PlainTextResponse(
            _metrics_text(label_store.stats()), media_type="text/plain; version=0.0.4"
        )

    add_admin_routes(app, label_store, settings, page, clock)
    return app


def default_app(deployment: Deployment, settings: TriageSettings) -> FastAPI:
    """The app over the deployment's label store and object store: the ones the pipeline reads
    and writes (PostgreSQL and S3 in production), never a store of its own."""
    from mri_assets.resources.deployed import label_store_for, object_store_for
    from mri_assets.triage.slice_reader import SliceReader

    reader = SliceReader(object_store_for(deployment))
    return create_app(label_store_for(deployment), reader, settings)


def serve(
    deployment: Deployment, host: str = "127.0.0.1", port: int = 8765,
    settings: TriageSettings | None = None,
) -> None:
    import uvicorn

    app = default_app(deployment, settings or TriageSettings.from_deployment(deployment))
    uvicorn.run(app, host=host, port=port)


def add_user(deployment: Deployment, username: str, password: str, role: str = "clinician") -> None:
    """Create an annotator in the deployment's label store (`mri-assets triage add-user`)."""
    from mri_assets.resources.deployed import label_store_for

    label_store_for(deployment).add_annotator(username, password, role)
