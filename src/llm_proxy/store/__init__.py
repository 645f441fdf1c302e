"""Persistence for the usage ledger: engine, tables, repositories and Alembic migrations."""
