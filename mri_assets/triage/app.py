"""The clinicians' triage web app: log in, label leased slices with the keyboard, admin pages.

`create_app(label_store, load_slice_png, settings)` builds the FastAPI app; `serve(deployment,
host, port)` runs it with uvicorn over the deployment's label store and object store. The
routes are `APIRouter`s by concern in `triage/routes/` (login, labelling, JSON API, metrics,
admin); each reads the app's `TriageContext` (`triage/context.py`) from `app.state`.

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
from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from mri_assets.deployment import Deployment
from mri_assets.resources import label_store as store_errors
from mri_assets.resources.label_store import LabelStore, utc_now
from mri_assets.triage import auth
from mri_assets.triage.context import HERE, TriageContext
from mri_assets.triage.raw_slices import RawSlice, RawSliceReader
from mri_assets.triage.routes import ROUTERS
from mri_assets.triage.routes.metrics import metrics_text as _metrics_text
from mri_assets.triage.security import BodyLimit, OriginCheck, SecurityHeaders, check_secret
from mri_assets.triage.settings import TriageSettings
from mri_assets.triage.slice_reader import SliceReader

__all__ = ["TriageSettings", "WeakSecret", "_metrics_text", "add_user", "create_app", "serve"]

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


class WeakSecret(ValueError):
    """The session secret is weak or a default: the app does not start with it."""


def _checked_secret(settings: TriageSettings) -> None:
    weakness = check_secret(settings.secret_key)
    if weakness is not None and not settings.demo:
        raise WeakSecret(
            f"the triage session secret is too weak ({weakness}): set MRI_ASSETS_TRIAGE_SECRET "
            "to at least 32 random characters, e.g. the output of `python -c \"import secrets; "
            "print(secrets.token_urlsafe(32))\"` (or MRI_ASSETS_TRIAGE_DEMO=1 for a demo)"
        )
    if weakness is not None:
        log.warning("demo mode: the triage session secret is weak (%s)", weakness)


async def _refused(_request: Request, error: store_errors.LabelStoreError) -> JSONResponse:
    """A label store refusal as JSON, with the status of its kind (and when labelling resumes)."""
    status = next(code for cls, code in _ERROR_STATUS.items() if isinstance(error, cls))
    body = {"error": type(error).__name__, "detail": str(error)}
    if isinstance(error, store_errors.BudgetExhausted) and error.resumes_on is not None:
        body["resumes_on"] = error.resumes_on.isoformat()
    return JSONResponse(body, status)


async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
    """A validation error as bounded JSON (no echo of the input)."""
    problems = [
        {"loc": [str(part) for part in e.get("loc", ())][:6], "msg": str(e.get("msg"))[:200]}
        for e in error.errors()[:20]
    ]
    return JSONResponse({"error": "InvalidRequest", "detail": problems}, 422)


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
    _checked_secret(settings)
    context = TriageContext(label_store, load_slice_png, settings, clock, load_raw_slice)

    app = FastAPI(title="mri_assets triage", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.triage = context
    # add_middleware: the last one added runs first.
    app.add_middleware(
        auth.SessionGate, resolve=context.resolve_session, cookie_secure=settings.cookie_secure
    )
    app.add_middleware(OriginCheck, allowed_origins=settings.allowed_origins)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders, hsts=settings.cookie_secure)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(store_errors.LabelStoreError, _refused)
    app.add_exception_handler(RequestValidationError, _invalid)
    for router in ROUTERS:
        app.include_router(router)
    return app


def default_app(deployment: Deployment, settings: TriageSettings) -> FastAPI:
    """The app over the deployment's label store and object store: the ones the pipeline reads
    and writes (PostgreSQL and S3 in production), never a store of its own."""
    from mri_assets.resources.deployed import label_store_for, object_store_for

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
