"""usage_events.usage_estimated: the row's token counts are estimates (the upstream reported none).

Revision ID: 0002_usage_estimated
Revises: 0001_usage_ledger
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from llm_proxy.store.db import migration_table

revision: str = "0002_usage_estimated"
down_revision: str | None = "0001_usage_ledger"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _table() -> str:
    return migration_table("usage_events")


def upgrade() -> None:
    # Rows written before this revision carry upstream-reported counts (or none): false.
    op.add_column(
        _table(), sa.Column("usage_estimated", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    with op.batch_alter_table(_table()) as batch:
        batch.drop_column("usage_estimated")
