"""usage_events.cost_usd: what an answer cost in USD (NULL: the model has no price, or nothing was used).

Revision ID: 0004_cost
Revises: 0003_api_keys
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from llm_proxy.store.db import migration_table

revision: str = "0004_cost"
down_revision: str | None = "0003_api_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _table() -> str:
    return migration_table("usage_events")


def upgrade() -> None:
    # Rows written before this revision have no cost: NULL (unknown), never 0.
    op.add_column(_table(), sa.Column("cost_usd", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(_table()) as batch:
        batch.drop_column("cost_usd")
