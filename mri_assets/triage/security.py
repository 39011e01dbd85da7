"""Request guards of the triage app, as plain ASGI middlewares (outermost first):

- `SecurityHeaders`: CSP without inline script, frame-ancestors 'none', nosniff, no referrer, no
  caching, and HSTS when cookies are `Secure` (the app is then served over HTTPS).
- `BodyLimit`: a request body over `max_bytes` is answered 413 before any parsing or login check
  (by its Content-Length, or while it streams in).
- `OriginCheck`: a state-changing request (not GET/HEAD/OPTIONS) whose Origin — or, without one,
  Referer — names another site is refused 403. Requests that carry neither (non-browser clients)
  pass on to the CSRF token check.
- `SessionGate` (in `auth.py`): every path but the public ones needs a live session.

`check_secret` is what `create_app` refuses to start with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
BASE_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # no-referrer would make form posts say Origin: null
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
HSTS = "max-age=31536000; includeSubDomains"
MIN_SECRET_CHARS = 32
KNOWN_WEAK_SECRETS = frozenset(
    {
        "secret", "changeme", "change-me", "change_me", "default", "development", "dev",
        "test", "testing", "password", "insecure", "session-secret", "session-secret-for-tests",
        "benchmark-secret", "mri-assets", "mri_assets", "triage", "triage-secret", "notsecret",
        "your-secret-key", "secret-key", "secret_key", "supersecret",
    }
)


def check_secret(secret: object) -> str | None:
    """Why `secret` is too weak to sign sessions with, or None when it will do."""
    if not isinstance(secret, str) or not secret:
        return "no secret is set"
    if secret.strip().casefold() in KNOWN_WEAK_SECRETS:
        return "it is a well-known default"
    if len(secret) < MIN_SECRET_CHARS:
        return f"it has {len(secret)} characters; at least {MIN_SECRET_CHARS} are needed"
    if len(set(secret)) < 12:
        return "it has fewer than 12 different characters"
    for weak in KNOWN_WEAK_SECRETS:
        if len(weak) >= 6 and secret.casefold().replace(weak, "") == "":
            return "it is a well-known default repeated"
    return None


async def send_json(send: Send, status: int, body: dict, headers: Iterable = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class SecurityHeaders:
    def __init__(self, app: ASGIApp, hsts: bool):
        self.app = app
        self.headers = dict(BASE_HEADERS, **({"strict-transport-security": HSTS} if hsts else {}))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        await send_json(
            send,
            413,
            {"error": "BodyTooLarge", "detail": f"request bodies are limited to {self.max_bytes} bytes"},
            [(b"connection", b"close")],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await send_json(send, 400, {"error": "BadRequest", "detail": "bad Content-Length"})
                return
            if int(declared) > self.max_bytes:
                await self._refuse(send)
                return
        received = 0
        started = refused = False

        async def counted_receive() -> Message:
            nonlocal received, refused, started
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Answer now; the app then sees a client that went away.
                    refused = True
                    if not started:
                        started = True
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except Exception:
            if not refused:
                raise


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class OriginCheck:
    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()):
        self.app = app
        self.allowed = {origin.rstrip("/").casefold() for origin in allowed_origins}

    def _same_site(self, scope: Scope, url: str) -> bool:
        if url.rstrip("/").casefold() in self.allowed:
            return True
        try:
            parts = urlsplit(url)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        origin = f"{parts.scheme}://{parts.netloc}".casefold()
        host = (header(scope, b"host") or "").casefold()
        return origin in self.allowed or (bool(host) and parts.netloc.casefold() == host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _SAFE_METHODS:
            origin = header(scope, b"origin")
            referer = header(scope, b"referer")
            claimed = origin if origin is not None else referer
            if claimed is not None and not self._same_site(scope, claimed):
                await send_json(
                    send,
                    403,
                    {
                        "error": "CrossOrigin",
                        "detail": "state-changing requests must come from this site's own pages",
                    },
                )
                return
        await self.app(scope, receive, send)
