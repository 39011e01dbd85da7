"""Server-side sessions, login throttling, account states, flagged queue items.

- `sessions`: one row per login; the cookie holds a random token, the row its keyed hash. Ended
  on logout, on disable/delete/role change/password reset, by an admin, or found idle/expired.
- `login_throttle`: failed logins per account and per client, with a lock end.
- `annotators`: `username_key` (the NFKC case-folded name logins are looked up by; unique),
  `disabled_at`, `deleted_at` (the row stays so that the name is never handed out again),
  `password_changed_at`.
- `queue_items`: `flag` (e.g. `missing_pixels`), `flagged_at`, `flagged_by`.

Revision ID: 0002_sessions_and_accounts
Revises: 0001_initial
"""

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0002_sessions_and_accounts"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def _fill_username_keys() -> None:
    """Existing names get their folded key; of names that fold alike only the oldest gets it
    (the others keep their labels but cannot log in until an admin renames them)."""
    bind = op.get_bind()
    rows = bind.execute(
        sa.text("SELECT username FROM annotators ORDER BY created_at, username")
    ).all()
    taken: set[str] = set()
    for (name,) in rows:
        key = unicodedata.normalize("NFKC", name).strip().casefold()
        if not key or key in taken:
            continue
        taken.add(key)
        bind.execute(
            sa.text("UPDATE annotators SET username_key = :key WHERE username = :name"),
            {"key": key, "name": name},
        )


def upgrade() -> None:
    op.add_column("annotators", sa.Column("username_key", sa.String(128), nullable=True))
    op.add_column("annotators", sa.Column("disabled_at", sa.DateTime, nullable=True))
    op.add_column("annotators", sa.Column("deleted_at", sa.DateTime, nullable=True))
    op.add_column("annotators", sa.Column("password_changed_at", sa.DateTime, nullable=True))
    _fill_username_keys()
    op.create_index("ux_annotators_key", "annotators", ["username_key"], unique=True)

    op.add_column("queue_items", sa.Column("flag", sa.String(32), nullable=True))
    op.add_column("queue_items", sa.Column("flagged_at", sa.DateTime, nullable=True))
    op.add_column("queue_items", sa.Column("flagged_by", sa.String(128), nullable=True))
    op.create_index("ix_queue_flag", "queue_items", ["flag"])
    op.create_index("ix_labels_annotator", "labels", ["annotator", "created_at"])

    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("last_seen_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("ended_at", sa.DateTime, nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
        sa.Column("client", sa.String(64), nullable=False, server_default=""),
        sa.Column("user_agent", sa.String(200), nullable=False, server_default=""),
    )
    op.create_index("ux_sessions_token", "sessions", ["token_hash"], unique=True)
    op.create_index("ix_sessions_user", "sessions", ["username", "ended_at"])
    op.create_index("ix_sessions_open", "sessions", ["ended_at", "last_seen_at"])

    op.create_table(
        "login_throttle",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failure_at", sa.DateTime, nullable=False),
        sa.Column("locked_until", sa.DateTime, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("login_throttle")
    op.drop_table("sessions")
    op.drop_index("ix_labels_annotator", table_name="labels")
    op.drop_index("ix_queue_flag", table_name="queue_items")
    op.drop_index("ux_annotators_key", table_name="annotators")
    with op.batch_alter_table("queue_items") as batch:
        for column in ("flagged_by", "flagged_at", "flag"):
            batch.drop_column(column)
    with op.batch_alter_table("annotators") as batch:
        for column in ("password_changed_at", "deleted_at", "disabled_at", "username_key"):
            batch.drop_column(column)
