"""Annotator accounts (mixed into `LabelStore`): add one (no look-alike names, no weak
passwords), authenticate, roles, disable/enable, delete, reset a password, unlock after failed
logins. Every change but enable and unlock ends the account's sessions (`sessions.py`), and the
last active admin can be neither demoted, disabled nor deleted."""

from __future__ import annotations

from datetime import datetime

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


class AccountsMixin:
    """Accounts; needs `_write`, `_read`, `_audit` and `_end_sessions_of` (sessions)."""

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
