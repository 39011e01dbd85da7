"""What every route of the triage app works with, in one object: `TriageContext` (the label
store, the slice readers, the settings, the clock, the templates), kept on `app.state.triage` by
`create_app` and handed to a handler by the `Context` dependency."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated

import jinja2
from fastapi import Depends, Request
from fastapi.responses import Response
from fastapi.templating import Jinja2Templates

from mri_assets.resources.label_store import LabelStore, SessionInfo, token_hash
from mri_assets.triage import auth
from mri_assets.triage.raw_slices import RawSlice
from mri_assets.triage.settings import TriageSettings

HERE = Path(__file__).parent


def page_templates() -> Jinja2Templates:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True
    )
    return Jinja2Templates(env=environment)


@dataclass(frozen=True)
class TriageContext:
    """The app's collaborators. `load_slice_png(wave, image_id)` gives the 256 px PNG,
    `load_raw_slice(wave, image_id)` the slice at its original values (None: PNG only);
    `clock` gives naive-UTC now for sessions."""

    label_store: LabelStore
    load_slice_png: Callable[[str, str], bytes]
    settings: TriageSettings
    clock: Callable[[], datetime]
    load_raw_slice: Callable[[str, str], RawSlice] | None = None
    templates: Jinja2Templates = field(default_factory=page_templates)

    @property
    def raw_enabled(self) -> bool:
        return self.load_raw_slice is not None

    def resolve_session(self, token: str, touch: bool) -> tuple[SessionInfo | None, str | None]:
        """The session gate's lookup: the live session of a cookie token, or why there is none."""
        return self.label_store.session_for(
            token_hash(self.settings.secret_key, token),
            idle_s=self.settings.session_idle_s,
            touch_after_s=self.settings.session_touch_s,
            touch=touch,
            now=self.clock(),
        )

    def secure_cookies(self, request: Request) -> bool:
        return self.settings.cookie_secure or request.url.scheme == "https"

    def page(self, request: Request, name: str, status_code: int = 200, **context) -> Response:
        """A server-rendered page with the user, role and CSRF token of the request; before
        login, the login form's token (set as a cookie when new)."""
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
        response = self.templates.TemplateResponse(
            request, name, context, status_code=status_code
        )
        if new_login_token:
            response.set_cookie(
                auth.LOGIN_COOKIE, new_login_token, max_age=3600, httponly=True,
                samesite="strict", secure=self.secure_cookies(request), path="/login",
            )
        return response

    def item_payload(self, item: dict, now: datetime) -> dict:
        """A leased item as the labelling page reads it (the prediction only when shown)."""
        expires = item["lease_expires_at"]
        payload = {
            "id": item["id"],
            "wave": item["wave"],
            "kind": item["kind"],
            "class_set": item["class_set"],
            "image_url": f"/image/{item['id']}.png",
            "raw_url": f"/image/{item['id']}.raw" if self.raw_enabled else None,
            "lease_expires_at": expires.isoformat() + "Z",
            "lease_seconds_left": max(0.0, round((expires - now).total_seconds(), 1)),
        }
        if self.settings.show_prediction:
            payload["prediction"] = item["prediction"]
        return payload


def triage_context(request: Request) -> TriageContext:
    return request.app.state.triage


Context = Annotated[TriageContext, Depends(triage_context)]
