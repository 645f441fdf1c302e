"""SQLAlchemy Core tables of the ledger: usage_events (one row per request) and stored_completions, each name
after database.table_prefix."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Dialect,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import DateTime, TypeDecorator

from .ledger_db import ID_LEN, NAME_LEN, SHORT_LEN, check_table_prefix


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes: `timestamptz` on PostgreSQL, naive-UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        out: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
        if out.tzinfo is None:
            return out.replace(tzinfo=UTC)
        return out.astimezone(UTC)


JsonType = JSON().with_variant(JSONB(), "postgresql")

@dataclass(frozen=True, slots=True)
class LedgerTables:
    metadata: MetaData
    usage_events: Table
    stored_completions: Table


@functools.lru_cache(maxsize=8)
def ledger_tables(prefix: str = "") -> LedgerTables:
    """The tables with database.table_prefix before their names (and so before their index and key names)."""
    check_table_prefix(prefix)
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    usage_events = Table(
        prefix + "usage_events",
        metadata,
        Column("request_id", String(ID_LEN), primary_key=True),  # the idempotency key
        Column("started_at", UtcDateTime(), nullable=False),
        Column("ended_at", UtcDateTime(), nullable=False),
        Column("subject", String(NAME_LEN)),
        Column("username", String(NAME_LEN)),
        Column("endpoint", String(SHORT_LEN), nullable=False),
        Column("model", String(NAME_LEN)),  # the public model id the client asked for
        Column("provider_id", String(NAME_LEN)),
        Column("upstream_model", String(NAME_LEN)),
        Column("streamed", Boolean(), nullable=False, server_default=false()),
        Column("status", Integer(), nullable=False),
        Column("error_type", String(SHORT_LEN)),
        Column("prompt_tokens", BigInteger()),
        Column("completion_tokens", BigInteger()),
        Column("total_tokens", BigInteger()),
        Column("cached_tokens", BigInteger()),
        Column("latency_ms", Double()),
        Column("ttft_ms", Double()),
        Column("upstream_latency_ms", Double()),
        Column("attempts", Integer(), nullable=False, server_default=text("1")),
        Column("extra", JsonType),
        Column("usage_estimated", Boolean(), nullable=False, server_default=false()),  # counts are estimates
        Column("cost_usd", Double()),  # USD (core/pricing.py); NULL: the model has no price, or nothing was used
        Column("groups", JsonType),  # the caller's groups, a JSON array; NULL: none (or a row from before 0005)
        Column("client_api", String(SHORT_LEN)),  # the ingress's name ("openai.chat", ...); NULL: not recorded
    )
    # BRIN on PostgreSQL: rows arrive in (nearly) time order, so a block-range index serves time-range reports
    # at a fraction of a B-tree's insert cost. SQLite ignores the option and builds a B-tree.
    Index(f"ix_{prefix}usage_events_started_at", usage_events.c.started_at, postgresql_using="brin")
    Index(f"ix_{prefix}usage_events_subject_started_at", usage_events.c.subject, usage_events.c.started_at)

    stored_completions = Table(
        prefix + "stored_completions",
        metadata,
        Column("request_id", String(ID_LEN), primary_key=True),
        Column("completion_id", String(NAME_LEN), nullable=False),  # the `id` the client saw (chatcmpl-...)
        Column("created_at", UtcDateTime(), nullable=False),
        Column("subject", String(NAME_LEN)),
        Column("username", String(NAME_LEN)),
        Column("model", String(NAME_LEN)),
        Column("input_messages", JsonType, nullable=False),
        Column("response", JsonType, nullable=False),
    )
    Index(f"ix_{prefix}stored_completions_completion_id", stored_completions.c.completion_id)
    Index(f"ix_{prefix}stored_completions_subject_created_at", stored_completions.c.subject,
          stored_completions.c.created_at)
    return LedgerTables(metadata, usage_events, stored_completions)


# Without a prefix.
_default = ledger_tables()
metadata = _default.metadata
usage_events = _default.usage_events
stored_completions = _default.stored_completions
