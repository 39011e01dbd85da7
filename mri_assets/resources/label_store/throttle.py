"""Login throttling (mixed into `LabelStore`).

Every failed login counts against the account (by folded name, known or not) and the client
address. Past a few free failures each further one locks the key for a delay that doubles (1 s,
2 s, 4 s, ...); at the lockout count the key is locked for `lockout_s`. While a key is locked,
logins for it are refused without looking at the password. Counts are forgotten after
`forget_after_s` without failures; a successful login clears the account's count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from mri_assets.resources.label_store.common import bounded
from mri_assets.resources.label_store.passwords import username_key
from mri_assets.resources.label_store.schema import login_throttle, utc_now


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
class LoginOutcome:
    """What a login attempt came to: `username` when it succeeded, else `locked_until` (when
    the account or client is locked now) and `failures` (of the account)."""

    username: str | None = None
    locked_until: datetime | None = None
    failures: int = 0


class ThrottleMixin:
    """Failed-login counts and locks; needs `_write`, `_read`, `_audit`."""

    @staticmethod
    def throttle_keys(username: str, client: str) -> tuple[str, str]:
        key = username_key(username) if isinstance(username, str) else ""
        return f"account:{key[:128]}", f"client:{bounded(client, 64)}"

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
