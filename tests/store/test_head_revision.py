"""The shipped HEAD_REVISION constant matches the newest Alembic revision (it lets start-up skip Alembic)."""

from __future__ import annotations

import re
from pathlib import Path

from llm_proxy.store.db import HEAD_REVISION, MIGRATIONS_DIR


def test_head_revision_is_newest_migration() -> None:
    revisions: dict[str, str | None] = {}
    for f in (Path(MIGRATIONS_DIR) / "versions").glob("*.py"):
        text = f.read_text()
        rev = re.search(r'^revision(?:: str)? = "([^"]+)"', text, re.M)
        down = re.search(r'^down_revision(?:: [^=]+)? = (?:"([^"]+)"|None)', text, re.M)
        assert rev and down
        revisions[rev.group(1)] = down.group(1)
    heads = set(revisions) - {d for d in revisions.values() if d}
    assert heads == {HEAD_REVISION}
