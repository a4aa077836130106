"""how a batch's images were chosen from those drawn (oversample, per class drawn / kept)

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batches made before every image drawn was kept: {}.
    with op.batch_alter_table("synthetic_batches", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("selection", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("synthetic_batches", schema=None) as batch_op:
        batch_op.drop_column("selection")
