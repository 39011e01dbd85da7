"""Initial label store: queue items, labels, annotators, append-only audit log, budget periods.

Revision ID: 0001_initial
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

_APPEND_ONLY_SQLITE = (
    (
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
    ),
    (
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
    ),
)
_APPEND_ONLY_POSTGRES = (
    (
        "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$"
    ),
    (
        "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
    ),
)


def upgrade() -> None:
    op.create_table(
        "queue_items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("wave", sa.String(128), nullable=False),
        sa.Column("image_id", sa.String(64), nullable=False),
        sa.Column("priority", sa.Float, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("state", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime, nullable=True),
        sa.Column("kind", sa.String(16), nullable=False, server_default="expert"),
        sa.Column("class_set", sa.Text, nullable=False),
        sa.Column("excluded_annotator", sa.String(128), nullable=True),
        sa.Column("prediction", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.CheckConstraint("state IN ('queued', 'leased', 'done', 'skipped')", name="ck_state"),
        sa.CheckConstraint("kind IN ('expert', 'qa', 'holdout')", name="ck_kind"),
    )
    op.create_index("ix_queue_next", "queue_items", ["state", sa.text("priority DESC"), "id"])
    op.create_index("ix_queue_lease", "queue_items", ["state", "lease_expires_at"])
    op.create_index("ix_queue_image", "queue_items", ["image_id"])
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("queue_items.id"), nullable=False),
        sa.Column("image_id", sa.String(64), nullable=False),
        sa.Column("wave", sa.String(128), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("annotator", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("seconds_spent", sa.Float, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.UniqueConstraint("item_id", name="uq_labels_item"),
        sa.CheckConstraint("kind IN ('expert', 'qa')", name="ck_label_kind"),
    )
    op.create_index("ix_labels_wave", "labels", ["wave"])
    op.create_index("ix_labels_created", "labels", ["created_at"])
    op.create_index("ix_labels_image", "labels", ["image_id"])
    op.create_table(
        "annotators",
        sa.Column("username", sa.String(128), primary_key=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.CheckConstraint("role IN ('clinician', 'admin')", name="ck_role"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("who", sa.String(128), nullable=False),
        sa.Column("what", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
    )
    op.create_table(
        "budget_periods",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("starts_on", sa.Date, nullable=False, unique=True),
        sa.Column("ends_on", sa.Date, nullable=False),
        sa.Column("cases_cap", sa.Integer, nullable=False),
        sa.Column("cap_cents", sa.Integer, nullable=False),
        sa.Column("cases_used", sa.Integer, nullable=False, server_default="0"),
        sa.Column("spent_cents", sa.Integer, nullable=False, server_default="0"),
    )
    statements = {"sqlite": _APPEND_ONLY_SQLITE, "postgresql": _APPEND_ONLY_POSTGRES}
    for statement in statements.get(op.get_bind().dialect.name, ()):
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    for table in ("budget_periods", "audit_log", "annotators", "labels", "queue_items"):
        op.drop_table(table)
