"""usage_events.groups (the caller's groups, a JSON array: jsonb on PostgreSQL, JSON text on SQLite) and
usage_events.client_api (the ingress's name, e.g. "openai.chat").

Revision ID: 0005_groups_client_api
Revises: 0004_cost
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from llm_proxy.store.db import migration_table

revision: str = "0005_groups_client_api"
down_revision: str | None = "0004_cost"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _table() -> str:
    return migration_table("usage_events")


def upgrade() -> None:
    # Rows written before this revision have neither: NULL (no groups known, client API not recorded).
    table = _table()
    op.add_column(table, sa.Column("groups", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True))
    op.add_column(table, sa.Column("client_api", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(_table()) as batch:
        batch.drop_column("client_api")
        batch.drop_column("groups")
