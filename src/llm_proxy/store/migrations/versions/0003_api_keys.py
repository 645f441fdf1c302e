"""Create api_keys (service API keys, stored as sha256 hashes).

Revision ID: 0003_api_keys
Revises: 0002_usage_estimated
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from llm_proxy.store.db import migration_table

revision: str = "0003_api_keys"
down_revision: str | None = "0002_usage_estimated"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _table() -> str:
    return migration_table("api_keys")


def upgrade() -> None:
    table = _table()
    op.create_table(
        table,
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),  # JSON array of model ids / globs
        sa.Column("created_at", sa.Double(), nullable=False),  # unix seconds
        sa.Column("expires_at", sa.Double()),
        sa.Column("revoked_at", sa.Double()),
        sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
        sa.UniqueConstraint("key_hash", name=f"uq_{table}_key_hash"),
    )


def downgrade() -> None:
    op.drop_table(_table())
