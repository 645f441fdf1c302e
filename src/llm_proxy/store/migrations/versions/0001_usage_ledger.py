"""Create usage_events and stored_completions.

Revision ID: 0001_usage_ledger
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0001_usage_ledger"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _prefix() -> str:
    """database.table_prefix (migrations/env.py puts it in the config's attributes)."""
    return str(context.config.attributes.get("table_prefix") or "")


def upgrade() -> None:
    p = _prefix()
    op.create_table(
        p + "usage_events",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("subject", sa.String(255)),
        sa.Column("username", sa.String(255)),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("model", sa.String(255)),
        sa.Column("provider_id", sa.String(255)),
        sa.Column("upstream_model", sa.String(255)),
        sa.Column("streamed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error_type", sa.String(64)),
        sa.Column("prompt_tokens", sa.BigInteger()),
        sa.Column("completion_tokens", sa.BigInteger()),
        sa.Column("total_tokens", sa.BigInteger()),
        sa.Column("cached_tokens", sa.BigInteger()),
        sa.Column("latency_ms", sa.Double()),
        sa.Column("ttft_ms", sa.Double()),
        sa.Column("upstream_latency_ms", sa.Double()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("extra", _json()),
        sa.PrimaryKeyConstraint("request_id", name=f"pk_{p}usage_events"),
    )
    # BRIN on PostgreSQL (rows arrive in about time order; far cheaper to maintain than a B-tree).
    op.create_index(f"ix_{p}usage_events_started_at", p + "usage_events", ["started_at"], postgresql_using="brin")
    op.create_index(f"ix_{p}usage_events_subject_started_at", p + "usage_events", ["subject", "started_at"])
    op.create_table(
        p + "stored_completions",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("completion_id", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("subject", sa.String(255)),
        sa.Column("username", sa.String(255)),
        sa.Column("model", sa.String(255)),
        sa.Column("input_messages", _json(), nullable=False),
        sa.Column("response", _json(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=f"pk_{p}stored_completions"),
    )
    op.create_index(f"ix_{p}stored_completions_completion_id", p + "stored_completions", ["completion_id"])
    op.create_index(
        f"ix_{p}stored_completions_subject_created_at", p + "stored_completions", ["subject", "created_at"]
    )


def downgrade() -> None:
    p = _prefix()
    op.drop_table(p + "stored_completions")
    op.drop_table(p + "usage_events")
