"""The clinicians' triage web app: log in, label leased slices with the keyboard, admin totals.

`create_app(label_store, load_slice_png, settings)` builds the FastAPI app; `serve(deployment,
host, port)` runs it with uvicorn over the deployment's label store and object store.

Every route except /login and /static refuses anonymous requests: pages redirect to /login,
API routes answer 401, /admin answers 403 to non-admins, and /metrics needs
`Authorization: Bearer <metrics_token>` (env `MRI_ASSETS_METRICS_TOKEN`; with no token
configured /metrics always answers 401).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jinja2
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from starlette.middleware.sessions import SessionMiddleware

from mri_assets.deployment import Deployment
from mri_assets.resources import label_store as store_errors
from mri_assets.resources.label_store import LabelStore
from mri_assets.triage import auth
from mri_assets.triage.slice_reader import SliceNotFound

HERE = Path(__file__).parent
log = logging.getLogger(__name__)

_ERROR_STATUS = {
    store_errors.UnknownItem: 404,
    store_errors.LabelNotInClassSet: 422,
    store_errors.ItemLeasedToOther: 409,
    store_errors.LeaseLost: 409,
    store_errors.ItemClosed: 409,
    store_errors.BudgetExhausted: 409,
    store_errors.LabelStoreError: 400,
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class TriageSettings:
    secret_key: str
    metrics_token: str | None = None
    show_prediction: bool = False
    lease_seconds: int = 300
    session_max_age_s: int = 8 * 3600
    cookie_secure: bool = False

    @classmethod
    def from_env(cls) -> TriageSettings:
        secret = os.environ.get("MRI_ASSETS_TRIAGE_SECRET")
        if not secret:
            log.warning(
                "MRI_ASSETS_TRIAGE_SECRET is not set: using a random session secret, so "
                "clinicians must log in again after a restart (their labels and leases are kept)"
            )
            secret = secrets.token_urlsafe(32)
        return cls(
            secret_key=secret,
            metrics_token=os.environ.get("MRI_ASSETS_METRICS_TOKEN") or None,
            show_prediction=os.environ.get("MRI_ASSETS_TRIAGE_SHOW_PREDICTION") == "1",
            lease_seconds=int(os.environ.get("MRI_ASSETS_TRIAGE_LEASE_SECONDS", "300")),
            cookie_secure=os.environ.get("MRI_ASSETS_TRIAGE_COOKIE_SECURE") == "1",
        )


class ItemAction(BaseModel):
    item_id: int


class ItemActionThenNext(ItemAction):
    lease_next_held: list[int] | None = None


class LabelSubmission(ItemActionThenNext):
    label: str
    seconds_spent: float = 0.0


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


def _item_payload(item: dict, show_prediction: bool) -> dict:
    payload = {
        "id": item["id"],
        "wave": item["wave"],
        "kind": item["kind"],
        "class_set": item["class_set"],
        "image_url": f"/image/{item['id']}.png",
        "lease_expires_at": item["lease_expires_at"].isoformat() + "Z",
    }
    if show_prediction:
        payload["prediction"] = item["prediction"]
    return payload


def create_app(
    label_store: LabelStore,
    load_slice_png: Callable[[str, str], bytes],
    settings: TriageSettings,
) -> FastAPI:
    """The triage app over `label_store`; `load_slice_png(wave, image_id)` gives PNG bytes."""
    app = FastAPI(title="mri_assets triage", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.secret_key,
        session_cookie="triage_session",
        max_age=settings.session_max_age_s,
        same_site="strict",
        https_only=settings.cookie_secure,
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = _templates()

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(auth.LoginRequired)
    async def to_login(_request: Request, _error: auth.LoginRequired):
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(store_errors.LabelStoreError)
    async def refused(_request: Request, error: store_errors.LabelStoreError):
        status = next(code for cls, code in _ERROR_STATUS.items() if isinstance(error, cls))
        return JSONResponse({"error": type(error).__name__, "detail": str(error)}, status)

    def page(request: Request, name: str, **context) -> Response:
        context.update(
            user=request.session.get("user"),
            role=request.session.get("role"),
            csrf_token=auth.csrf_token(request),
        )
        return templates.TemplateResponse(request, name, context)

    @app.get("/login")
    def login_page(request: Request, error: str | None = None):
        return page(request, "login.html", error=error)

    @app.post("/login")
    def login(
        request: Request,
        username: str = Form(...),
        password: str = Form(...),
        csrf_token: str = Form(""),
    ):
        auth.check_csrf(request, csrf_token)
        if not label_store.verify_password(username, password):
            label_store.record_audit(username, "login_failed", {})
            response = page(request, "login.html", error="Unknown user or wrong password.")
            response.status_code = 401
            return response
        auth.log_in(request, username, label_store.annotator_role(username))
        label_store.record_audit(username, "login", {})
        return RedirectResponse("/", status_code=303)

    @app.get("/logout")
    def logout_page(request: Request, user: str = Depends(auth.page_user)):
        return page(request, "logout.html")

    @app.post("/logout")
    def logout(request: Request, csrf_token: str = Form(""), user: str = Depends(auth.page_user)):
        auth.check_csrf(request, csrf_token)
        auth.log_out(request)
        label_store.record_audit(user, "logout", {})
        return RedirectResponse("/login", status_code=303)

    @app.get("/")
    def labeling_page(request: Request, user: str = Depends(auth.page_user)):
        return page(request, "label.html", show_prediction=settings.show_prediction)

    @app.get("/admin")
    def admin_page(request: Request, user: str = Depends(auth.page_admin)):
        return page(request, "admin.html", stats=label_store.stats())

    @app.get("/api/next")
    def next_item(held: str = "", user: str = Depends(auth.api_user)):
        try:
            held_ids = [int(part) for part in held.split(",") if part]
        except ValueError as error:
            raise HTTPException(422, "held must be comma-separated item ids") from error
        item = label_store.lease_next(user, settings.lease_seconds, held=held_ids)
        return {"item": None if item is None else _item_payload(item, settings.show_prediction)}

    def checked(request: Request) -> None:
        auth.check_csrf(request, request.headers.get(auth.CSRF_HEADER))

    def answer_then_next(user: str, body: ItemActionThenNext, **answer) -> dict:
        """With `lease_next_held` the answer also carries the next item (one round trip)."""
        if body.lease_next_held is not None:
            item = label_store.lease_next(user, settings.lease_seconds, held=body.lease_next_held)
            answer["next"] = None if item is None else _item_payload(item, settings.show_prediction)
        return {"ok": True, **answer}

    @app.post("/api/label")
    def post_label(request: Request, body: LabelSubmission, user: str = Depends(auth.api_user)):
        checked(request)
        label_id = label_store.submit_label(body.item_id, user, body.label, body.seconds_spent)
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

    @app.get("/image/{item_id}.png")
    def item_image(request: Request, item_id: int, user: str = Depends(auth.api_user)):
        item = label_store.item(item_id)
        may_see = item is not None and (
            item["lease_owner"] == user or request.session.get("role") == "admin"
        )
        if not may_see:
            raise HTTPException(404, f"no item {item_id} leased to you")
        try:
            png = load_slice_png(item["wave"], item["image_id"])
        except SliceNotFound as error:
            raise HTTPException(404, str(error)) from error
        return Response(png, media_type="image/png")

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

    app = default_app(deployment, settings or TriageSettings.from_env())
    uvicorn.run(app, host=host, port=port)


def add_user(deployment: Deployment, username: str, password: str, role: str = "clinician") -> None:
    """Create an annotator in the deployment's label store (`mri-assets triage add-user`)."""
    from mri_assets.resources.deployed import label_store_for

    label_store_for(deployment).add_annotator(username, password, role)
