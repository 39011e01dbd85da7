"""Server-side sessions (mixed into `LabelStore`).

The triage app gives the browser a random token and hands the store only its keyed hash
(`token_hash`), so neither a copy of the database nor a copy of the cookie signing key lets
anyone make a session. A session is refused once it is ended (logout, an admin, the account
disabled, deleted, its role changed or its password reset), idle longer than `idle_s`, or past
its absolute `expires_at`; the role always comes from the account row, never from the session.
`last_seen_at` is written at most once per `touch_after_s`, so the idle timeout has that
granularity and the hot path of a request stays one indexed read.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from mri_assets.resources.label_store.common import bounded
from mri_assets.resources.label_store.schema import (
    LabelStoreError,
    UnknownAnnotator,
    sessions,
    utc_now,
)

END_REASONS = ("logged_out", "revoked", "idle", "expired", "ended_by_admin", "unknown")


@dataclass(frozen=True)
class SessionInfo:
    id: int
    username: str
    role: str
    csrf: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


def new_session_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(secret: str, token: str) -> str:
    """The keyed hash a session token is stored under."""
    return hmac.new(secret.encode(), token.encode(), "sha256").hexdigest()


class SessionsMixin:
    """Sessions; needs `_write`, `_read`, `_sql`, `_audit` and `_account_row` (accounts)."""

    def create_session(
        self,
        username: str,
        token_hash: str,
        lifetime_s: float,
        client: str = "",
        user_agent: str = "",
        now: datetime | None = None,
    ) -> SessionInfo:
        """A new session for an active account (one the caller just authenticated)."""
        now = now or utc_now()
        csrf = secrets.token_urlsafe(32)
        expires = now + timedelta(seconds=lifetime_s)
        with self._write() as conn:
            row = self._account_row(conn, username)
            if row is None or row.deleted_at is not None or row.disabled_at is not None:
                raise UnknownAnnotator(f"no active annotator {username!r}")
            session_id = conn.execute(
                sessions.insert().values(
                    token_hash=token_hash,
                    username=row.username,
                    csrf=csrf,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=expires,
                    client=bounded(client, 64),
                    user_agent=bounded(user_agent, 200),
                )
            ).inserted_primary_key[0]
            self._audit(
                conn,
                row.username,
                "login",
                {"session": session_id, "client": bounded(client, 64)},
                now,
            )
        return SessionInfo(session_id, row.username, row.role, csrf, now, now, expires)

    def session_for(
        self,
        token_hash: str,
        idle_s: float,
        touch_after_s: float = 60.0,
        touch: bool = True,
        now: datetime | None = None,
    ) -> tuple[SessionInfo | None, str | None]:
        """(the live session of `token_hash`, None) or (None, why not: one of END_REASONS)."""
        now = now or utc_now()
        with self._read() as conn:
            row = self._sql(conn, "session", token_hash=token_hash).first()
        if row is None:
            return None, "unknown"
        if row.ended_at is not None:
            return None, row.end_reason or "revoked"
        account_live = row.role is not None and row.disabled_at is None and row.deleted_at is None
        reason = (
            "revoked"
            if not account_live
            else "expired"
            if now >= row.expires_at
            else "idle"
            if (now - row.last_seen_at).total_seconds() >= idle_s
            else None
        )
        if reason is not None:
            self.end_session(row.id, reason, by="system", now=now)
            return None, reason
        last_seen = row.last_seen_at
        if touch and (now - row.last_seen_at).total_seconds() >= touch_after_s:
            with self._write() as conn:
                self._sql(conn, "touch_session", now=now, id=row.id)
            last_seen = now
        info = SessionInfo(
            row.id, row.username, row.role, row.csrf, row.created_at, last_seen, row.expires_at
        )
        return info, None

    def end_session(
        self, session_id: int, reason: str, by: str, now: datetime | None = None
    ) -> bool:
        """End one session; False when it had already ended."""
        if reason not in END_REASONS:
            raise LabelStoreError(f"reason must be one of {END_REASONS}, got {reason!r}")
        now = now or utc_now()
        with self._write() as conn:
            row = conn.execute(
                sa.select(sessions.c.username).where(
                    sessions.c.id == int(session_id), sessions.c.ended_at.is_(None)
                )
            ).first()
            if row is None:
                return False
            conn.execute(
                sessions.update()
                .where(sessions.c.id == int(session_id))
                .values(ended_at=now, end_reason=reason)
            )
            what = "logout" if reason == "logged_out" else "end_session"
            self._audit(
                conn, by, what, {"session": int(session_id), "username": row.username,
                                 "reason": reason}, now
            )
        return True

    @staticmethod
    def _end_sessions_of(conn: sa.Connection, username: str, reason: str, now: datetime) -> int:
        return conn.execute(
            sessions.update()
            .where(sessions.c.username == username, sessions.c.ended_at.is_(None))
            .values(ended_at=now, end_reason=reason)
        ).rowcount

    def sessions_list(
        self, idle_s: float, open_only: bool = True, limit: int = 200, now: datetime | None = None
    ) -> list[dict]:
        """Sessions, newest first; `state` is open, idle, expired or the end reason."""
        now = now or utc_now()
        query = sa.select(sessions).order_by(sessions.c.id.desc()).limit(limit)
        if open_only:
            query = query.where(
                sessions.c.ended_at.is_(None),
                sessions.c.expires_at > now,
                sessions.c.last_seen_at > now - timedelta(seconds=idle_s),
            )
        with self._read() as conn:
            rows = conn.execute(query).all()
        listed = []
        for row in rows:
            if row.ended_at is not None:
                state = row.end_reason or "ended"
            elif now >= row.expires_at:
                state = "expired"
            elif (now - row.last_seen_at).total_seconds() >= idle_s:
                state = "idle"
            else:
                state = "open"
            listed.append(
                {
                    "id": row.id,
                    "username": row.username,
                    "created_at": row.created_at,
                    "last_seen_at": row.last_seen_at,
                    "expires_at": row.expires_at,
                    "client": row.client,
                    "user_agent": row.user_agent,
                    "state": state,
                }
            )
        return listed
