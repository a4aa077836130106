"""audit trail: hash chain, head row, append-only triggers

Revision ID: 0005
Revises: 0004

Existing records are numbered and chained in id order. On SQLite a later batch migration
of audit_events recreates the table and so drops its triggers: such a migration must
create them again (chain.triggers).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from synthray.app.audit import chain
from synthray.app.db import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

events = sa.table(
    "audit_events",
    sa.column("id", sa.Integer()),
    sa.column("seq", sa.Integer()),
    sa.column("at", UTCDateTime()),
    sa.column("actor_key_id", sa.Integer()),
    sa.column("actor_name", sa.String()),
    sa.column("action", sa.String()),
    sa.column("object_type", sa.String()),
    sa.column("object_id", sa.String()),
    sa.column("outcome", sa.String()),
    sa.column("detail", sa.JSON()),
    sa.column("prev_hash", sa.String()),
    sa.column("hash", sa.String()),
)


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    conn = op.get_bind()
    prev, seq = chain.GENESIS, 0
    for row in conn.execute(sa.select(events).order_by(events.c.id)).mappings().all():
        seq += 1
        record = dict(row) | {"seq": seq, "detail": row["detail"] or {}}
        digest = chain.link(prev, chain.content(**{k: record[k] for k in CONTENT_KEYS}))
        conn.execute(
            events.update()
            .where(events.c.id == row["id"])
            .values(seq=seq, prev_hash=prev, hash=digest)
        )
        prev = digest
    conn.execute(head.insert().values(id=1, seq=seq, hash=prev))
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.alter_column("seq", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_audit_events_seq"), ["seq"])
    for statement in chain.triggers(conn.dialect.name):
        conn.execute(sa.text(statement))


CONTENT_KEYS = (
    "seq",
    "at",
    "actor_key_id",
    "actor_name",
    "action",
    "object_type",
    "object_id",
    "outcome",
    "detail",
)


def downgrade() -> None:
    conn = op.get_bind()
    for statement in chain.drop_triggers(conn.dialect.name):
        conn.execute(sa.text(statement))
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_audit_events_seq"), type_="unique")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("seq")
