"""export reviews: approvals by distinct reviewers, and rejections with their reason

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "export_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("export_id", sa.Integer(), nullable=False),
        sa.Column("reviewer_key_id", sa.Integer(), nullable=False),
        sa.Column("reviewer_name", sa.String(length=100), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["export_id"], ["exports.id"], name=op.f("fk_export_reviews_export_id_exports")
        ),
        sa.ForeignKeyConstraint(
            ["reviewer_key_id"],
            ["api_keys.id"],
            name=op.f("fk_export_reviews_reviewer_key_id_api_keys"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_reviews")),
        sa.UniqueConstraint(
            "export_id", "reviewer_key_id", name=op.f("uq_export_reviews_export_id")
        ),
    )
    with op.batch_alter_table("export_reviews", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_export_reviews_export_id"), ["export_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("export_reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_export_reviews_export_id"))
    op.drop_table("export_reviews")
