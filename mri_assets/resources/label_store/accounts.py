"""Annotator accounts, server-side sessions and login throttling (mixed into `LabelStore`).

Sessions: the triage app gives the browser a random token and hands the store only its keyed
hash (`token_hash`), so neither a copy of the database nor a copy of the cookie signing key lets
anyone make a session. A session is refused once it is ended (logout, an admin, the account
disabled, deleted, its role changed or its password reset), idle longer than `idle_s`, or past
its absolute `expires_at`; the role always comes from the account row, never from the session.
`last_seen_at` is written at most once per `touch_after_s`, so the idle timeout has that
granularity and the hot path of a request stays one indexed read.

Throttling: every failed login counts against the account (by folded name, known or not) and
the client address. Past a few free failures each further one locks the key for a delay that
doubles (1 s, 2 s, 4 s, ...); at the lockout count the key is locked for `lockout_s`. While a key
is locked, logins for it are refused without looking at the password. Counts are forgotten
after `forget_after_s` without failures; a successful login clears the account's count.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mri_assets.resources.label_store.passwords import (
    PasswordProblem,
    UsernameProblem,
    check_password,
    checked_username,
    look_alike_form,
    username_key,
)
from mri_assets.resources.label_store.schema import (
    AnnotatorExists,
    InvalidUsername,
    LabelStoreError,
    LastAdmin,
    UnknownAnnotator,
    WeakPassword,
    annotators,
    labels,
    login_throttle,
    sessions,
    utc_now,
)

ROLES = ("clinician", "admin")
_PASSWORD_HASHER = PasswordHasher()
_DUMMY_HASH = _PASSWORD_HASHER.hash("not-a-real-password")
_UNUSABLE_HASH = "!"  # a deleted account's password hash: no password verifies against it
END_REASONS = ("logged_out", "revoked", "idle", "expired", "ended_by_admin", "unknown")


@dataclass(frozen=True)
class LoginPolicy:
    """Throttling of failed logins (see the module docstring)."""

    account_free_failures: int = 3
    account_lockout_failures: int = 10
    client_free_failures: int = 10
    client_lockout_failures: int = 50
    first_delay_s: float = 1.0
    lockout_s: float = 900.0
    forget_after_s: float = 1800.0

    def locked_until(self, failures: int, free: int, lockout: int, now: datetime):
        if failures >= lockout:
            return now + timedelta(seconds=self.lockout_s)
        if failures <= free:
            return None
        delay = min(self.first_delay_s * 2 ** (failures - free - 1), self.lockout_s)
        return now + timedelta(seconds=delay)


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


def _bounded(text: object, limit: int) -> str:
    return str(text)[:limit]


@dataclass(frozen=True)
class LoginOutcome:
    """What a login attempt came to: `username` when it succeeded, else `locked_until` (when
    the account or client is locked now) and `failures` (of the account)."""

    username: str | None = None
    locked_until: datetime | None = None
    failures: int = 0


class AccountsMixin:
    """Accounts, sessions and throttling; needs `_write`, `_read`, `_sql`, `_audit`."""

    # -- annotators -------------------------------------------------------------------------

    def _hasher(self) -> PasswordHasher:
        return PasswordHasher(time_cost=self.argon2_time_cost, memory_cost=self.argon2_memory_kib)

    @staticmethod
    def _checked_password(password: object, username: str) -> str:
        try:
            check_password(password, username)
        except PasswordProblem as error:
            raise WeakPassword(str(error)) from error
        return password

    def add_annotator(
        self, username: str, password: str, role: str = "clinician", by: str = "system"
    ) -> str:
        """Create an account; return its (folded) username. Refuses look-alikes of existing
        names, weak passwords (`passwords.check_password`) and unknown roles."""
        try:
            name = checked_username(username)
        except UsernameProblem as error:
            raise InvalidUsername(f"username {username!r}: {error}") from error
        if role not in ROLES:
            raise LabelStoreError(f"role must be one of {ROLES}, got {role!r}")
        self._checked_password(password, name)
        password_hash = self._hasher().hash(password)
        now = utc_now()
        try:
            with self._write() as conn:
                skeleton = look_alike_form(name)
                for existing, existing_key in conn.execute(
                    sa.select(annotators.c.username, annotators.c.username_key)
                ):
                    if existing_key == name or existing == name:
                        raise AnnotatorExists(f"annotator {name!r} already exists")
                    if look_alike_form(existing_key or username_key(existing)) == skeleton:
                        raise AnnotatorExists(
                            f"username {name!r} looks like the existing {existing!r}; choose "
                            "a name that cannot be mistaken for it"
                        )
                conn.execute(
                    annotators.insert().values(
                        username=name,
                        username_key=name,
                        password_hash=password_hash,
                        role=role,
                        created_at=now,
                        password_changed_at=now,
                    )
                )
                self._audit(conn, by, "add_annotator", {"username": name, "role": role}, now)
        except sa.exc.IntegrityError as error:
            raise AnnotatorExists(f"annotator {name!r} already exists") from error
        return name

    def _account_row(self, conn: sa.Connection, username: str, lock: bool = False):
        query = sa.select(annotators).where(
            sa.or_(annotators.c.username == username, annotators.c.username_key == username)
        )
        if lock and conn.dialect.name == "postgresql":
            query = query.with_for_update()
        return conn.execute(query).first()

    def authenticate(self, username: str, password: str) -> str | None:
        """The account's username when `password` is right and the account is active, else
        None. Always costs one argon2 verification, known name or not."""
        key = username_key(username) if isinstance(username, str) else ""
        with self._read() as conn:
            row = conn.execute(
                sa.select(
                    annotators.c.username,
                    annotators.c.password_hash,
                    annotators.c.disabled_at,
                    annotators.c.deleted_at,
                ).where(annotators.c.username_key == key)
            ).first()
        usable = row is not None and row.disabled_at is None and row.deleted_at is None
        stored = row.password_hash if usable else _DUMMY_HASH
        try:
            verified = _PASSWORD_HASHER.verify(stored, password)
        except (VerificationError, InvalidHashError):
            verified = False
        return row.username if verified and usable else None

    def verify_password(self, username: str, password: str) -> bool:
        return self.authenticate(username, password) is not None

    def annotator_role(self, username: str) -> str | None:
        """The role of an account that is not deleted (disabled accounts keep their role)."""
        with self._read() as conn:
            row = self._account_row(conn, username)
        return None if row is None or row.deleted_at is not None else row.role

    def annotators_list(self, now: datetime | None = None) -> list[dict]:
        """Every account (deleted ones last) with its open sessions, labels and lock."""
        now = now or utc_now()
        with self._read() as conn:
            rows = conn.execute(
                sa.select(annotators).order_by(
                    annotators.c.deleted_at.is_not(None), annotators.c.username
                )
            ).all()
            open_sessions = dict(
                conn.execute(
                    sa.select(sessions.c.username, sa.func.count())
                    .where(sessions.c.ended_at.is_(None), sessions.c.expires_at > now)
                    .group_by(sessions.c.username)
                ).all()
            )
            label_counts = dict(
                conn.execute(
                    sa.select(labels.c.annotator, sa.func.count()).group_by(labels.c.annotator)
                ).all()
            )
            locks = dict(
                conn.execute(
                    sa.select(login_throttle.c.key, login_throttle.c.locked_until).where(
                        login_throttle.c.locked_until > now
                    )
                ).all()
            )
        return [
            {
                "username": row.username,
                "role": row.role,
                "created_at": row.created_at,
                "state": "deleted"
                if row.deleted_at is not None
                else "disabled"
                if row.disabled_at is not None
                else "active",
                "open_sessions": open_sessions.get(row.username, 0),
                "labels": label_counts.get(row.username, 0),
                "locked_until": locks.get(f"account:{row.username_key}"),
                "can_log_in": row.username_key is not None,
            }
            for row in rows
        ]

    def _active_admins(self, conn: sa.Connection) -> int:
        return conn.execute(
            sa.select(sa.func.count())
            .select_from(annotators)
            .where(
                annotators.c.role == "admin",
                annotators.c.disabled_at.is_(None),
                annotators.c.deleted_at.is_(None),
            )
        ).scalar_one()

    def _change_account(self, username: str, by: str, what: str, change) -> None:
        """Apply `change(conn, row, now)` to a live account, end its sessions, audit it."""
        now = utc_now()
        with self._write() as conn:
            row = self._account_row(conn, username, lock=True)
            if row is None or row.deleted_at is not None:
                raise UnknownAnnotator(f"no annotator {username!r}")
            payload = change(conn, row, now) or {}
            ended = self._end_sessions_of(conn, row.username, "revoked", now)
            self._audit(
                conn, by, what, {"username": row.username, "sessions_ended": ended, **payload}, now
            )

    def _guard_last_admin(self, conn: sa.Connection, row) -> None:
        live_admin = row.role == "admin" and row.disabled_at is None and row.deleted_at is None
        if live_admin and self._active_admins(conn) <= 1:
            raise LastAdmin(
                f"{row.username!r} is the only active admin; make another admin first"
            )

    def set_role(self, username: str, role: str, by: str = "system") -> None:
        if role not in ROLES:
            raise LabelStoreError(f"role must be one of {ROLES}, got {role!r}")

        def change(conn, row, _now):
            if role != "admin":
                self._guard_last_admin(conn, row)
            conn.execute(
                annotators.update().where(annotators.c.username == row.username).values(role=role)
            )
            return {"from": row.role, "to": role}

        self._change_account(username, by, "set_role", change)

    def disable_annotator(self, username: str, by: str = "system") -> None:
        def change(conn, row, now):
            self._guard_last_admin(conn, row)
            conn.execute(
                annotators.update()
                .where(annotators.c.username == row.username)
                .values(disabled_at=row.disabled_at or now)
            )

        self._change_account(username, by, "disable_annotator", change)

    def enable_annotator(self, username: str, by: str = "system") -> None:
        def change(conn, row, _now):
            conn.execute(
                annotators.update()
                .where(annotators.c.username == row.username)
                .values(disabled_at=None)
            )

        self._change_account(username, by, "enable_annotator", change)

    def delete_annotator(self, username: str, by: str = "system") -> None:
        """The account can no longer log in and leaves the lists; its labels keep its name,
        and the name is never given to another account."""

        def change(conn, row, now):
            self._guard_last_admin(conn, row)
            conn.execute(
                annotators.update()
                .where(annotators.c.username == row.username)
                .values(deleted_at=now, password_hash=_UNUSABLE_HASH)
            )

        self._change_account(username, by, "delete_annotator", change)

    def reset_password(self, username: str, password: str, by: str = "system") -> None:
        with self._read() as conn:
            row = self._account_row(conn, username)
        self._checked_password(password, row.username if row else username)
        password_hash = self._hasher().hash(password)

        def change(conn, row, now):
            conn.execute(
                annotators.update()
                .where(annotators.c.username == row.username)
                .values(password_hash=password_hash, password_changed_at=now)
            )

        self._change_account(username, by, "reset_password", change)

    def unlock_annotator(self, username: str, by: str = "system") -> None:
        """Forget the failed logins of an account (not of the clients that made them)."""
        now = utc_now()
        with self._write() as conn:
            row = self._account_row(conn, username)
            if row is None:
                raise UnknownAnnotator(f"no annotator {username!r}")
            conn.execute(
                login_throttle.delete().where(
                    login_throttle.c.key == f"account:{row.username_key}"
                )
            )
            self._audit(conn, by, "unlock_annotator", {"username": row.username}, now)

    # -- sessions ---------------------------------------------------------------------------

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
                    client=_bounded(client, 64),
                    user_agent=_bounded(user_agent, 200),
                )
            ).inserted_primary_key[0]
            self._audit(
                conn,
                row.username,
                "login",
                {"session": session_id, "client": _bounded(client, 64)},
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

    # -- login throttling -------------------------------------------------------------------

    @staticmethod
    def throttle_keys(username: str, client: str) -> tuple[str, str]:
        key = username_key(username) if isinstance(username, str) else ""
        return f"account:{key[:128]}", f"client:{_bounded(client, 64)}"

    def login_locked_until(
        self, keys: Sequence[str], now: datetime | None = None
    ) -> datetime | None:
        """The latest lock end among `keys` that is still in the future, else None."""
        now = now or utc_now()
        with self._read() as conn:
            until = conn.execute(
                sa.select(sa.func.max(login_throttle.c.locked_until)).where(
                    login_throttle.c.key.in_(list(keys)), login_throttle.c.locked_until > now
                )
            ).scalar()
        return until

    def _count_failure(
        self, conn: sa.Connection, key: str, free: int, lockout: int, policy: LoginPolicy,
        now: datetime,
    ) -> tuple[int, datetime | None]:
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        conn.execute(
            insert(login_throttle)
            .values(key=key, failures=0, last_failure_at=now, locked_until=None)
            .on_conflict_do_nothing(index_elements=["key"])
        )
        query = sa.select(login_throttle).where(login_throttle.c.key == key)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).one()
        stale = (now - row.last_failure_at).total_seconds() >= policy.forget_after_s
        failures = 1 if stale else row.failures + 1
        until = policy.locked_until(failures, free, lockout, now)
        conn.execute(
            login_throttle.update()
            .where(login_throttle.c.key == key)
            .values(failures=failures, last_failure_at=now, locked_until=until)
        )
        return failures, until

    def record_login_failure(
        self, username: str, client: str, policy: LoginPolicy, now: datetime | None = None
    ) -> LoginOutcome:
        """Count a failed login against the account and the client; audit it (and a lockout)."""
        now = now or utc_now()
        account_key, client_key = self.throttle_keys(username, client)
        with self._write() as conn:
            failures, account_until = self._count_failure(
                conn, account_key, policy.account_free_failures,
                policy.account_lockout_failures, policy, now,
            )
            client_failures, client_until = self._count_failure(
                conn, client_key, policy.client_free_failures,
                policy.client_lockout_failures, policy, now,
            )
            who = account_key.removeprefix("account:")[:64] or "anonymous"
            self._audit(
                conn, who, "login_failed",
                {"client": client_key.removeprefix("client:"), "failures": failures,
                 "client_failures": client_failures},
                now,
            )
            for key, count, lockout, until in (
                (account_key, failures, policy.account_lockout_failures, account_until),
                (client_key, client_failures, policy.client_lockout_failures, client_until),
            ):
                if count >= lockout:
                    self._audit(
                        conn, who, "login_locked",
                        {"key": key[:150], "failures": count, "until": until.isoformat()}, now,
                    )
            self._prune_throttle(conn, policy, now)
        locks = [u for u in (account_until, client_until) if u is not None]
        return LoginOutcome(None, max(locks) if locks else None, failures)

    def record_login_success(self, username: str) -> None:
        account_key, _ = self.throttle_keys(username, "")
        with self._write() as conn:
            conn.execute(login_throttle.delete().where(login_throttle.c.key == account_key))

    def _prune_throttle(self, conn: sa.Connection, policy: LoginPolicy, now: datetime) -> None:
        pruned = getattr(self, "_throttle_pruned_at", None)
        if pruned is not None and (now - pruned).total_seconds() < 600:
            return
        conn.execute(
            login_throttle.delete().where(
                login_throttle.c.last_failure_at < now - timedelta(seconds=policy.forget_after_s),
                sa.or_(
                    login_throttle.c.locked_until.is_(None), login_throttle.c.locked_until < now
                ),
            )
        )
        self._throttle_pruned_at = now


def token_hash(secret: str, token: str) -> str:
    """The keyed hash a session token is stored under."""
    return hmac.new(secret.encode(), token.encode(), "sha256").hexdigest()
