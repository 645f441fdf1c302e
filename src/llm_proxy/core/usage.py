"""The usage ledger: every event is journaled to a local append-only file, then batched into the database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

from ..config import LoadedConfig
from ..errors import ServiceUnavailable
from ..store.connect import open_ledger_db
from ..store.db_url import parse_db_url
from ..store.journal import (
    _BATCH_BYTES,
    Journal,
    _Cursor,
    _list_segments,
    _orphan_lock,
    _read_lines,
    _read_tail,
    _remove_dir,
)
from ..store.journal_format import _OPTS, _default, _journal_line, _readable, _sanitized
from ..store.ledger_db import LedgerDB
from ..types import UsageEvent

log = logging.getLogger("llm_proxy.usage")

_REJECTED = "rejected.jsonl"
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 5.0
_BACKLOG_WARN = 1000
_FLUSH_WAIT = 1.0  # how long a read of stored responses waits for this process's rows still queued


@dataclasses.dataclass(slots=True, eq=False)
class _Batch:
    """Rows being written: from the in-memory queue, or read back from the journal (then `end` is where
    the rows after it start)."""

    lines: list[bytes]
    end: _Cursor | None
    task: asyncio.Task[None]


class UsageLedger(Journal):
    """UsageSink that never blocks and never drops.

    record() serialises the event as one JSON array line and copies it into the current journal segment
    through a shared file mapping of space reserved in advance: the bytes are in the page cache at once,
    so a killed process loses nothing record() returned from, and no system call is made per event (a
    line that does not fit, or a file system where space cannot be reserved, takes pwrite instead). It
    then queues the line in memory. A
    background writer inserts batches (by size or time; on PostgreSQL two at a time, completed in order)
    idempotently on request_id; while the database is away rows wait in the journal and the writer
    retries with bounded backoff. When the in-memory
    queue is full the writer reads the overflow back from the journal, in order. Journal segments are
    deleted (or truncated) once every row in them is committed. Each process journals into its own
    locked directory under spool_dir; directories left by dead processes are replayed at start.
    """

    def __init__(
        self,
        database_url: str,
        spool_dir: str | os.PathLike[str],
        *,
        batch_size: int = 1000,
        flush_interval: float = 0.25,
        queue_size: int = 20000,
        auto_migrate: bool = True,
        segment_bytes: int = 8 << 20,
        close_timeout: float = 5.0,
        migrate_timeout: float = 15.0,
        orphan_scan_interval: float = 60.0,
        concurrency: int | None = None,
        table_prefix: str = "",
    ) -> None:
        url = parse_db_url(database_url)  # fail early on an unsupported URL
        super().__init__(spool_dir, segment_bytes)
        self._table_prefix = table_prefix
        # Batches in flight at once. PostgreSQL: two, so one backend works while the next batch travels (and
        # a second core helps); SQLite serialises writers anyway.
        self._concurrency = concurrency or (1 if url.backend == "sqlite" else 2)
        self.database_url = database_url
        self._batch_size = batch_size
        self._interval = flush_interval
        self._queue_size = queue_size
        self._auto_migrate = auto_migrate
        self._close_timeout = close_timeout
        self._migrate_timeout = migrate_timeout
        self._scan_interval = orphan_scan_interval
        self._db: LedgerDB | None = None  # asyncpg / aiosqlite directly: no SQLAlchemy on the write path

        self._committed = 0  # rows [0, _committed) are in the database
        # Journal lines of rows [_committed, cursor.seq or _seq): the in-memory queue.
        self._mem: deque[bytes] = deque()
        self._cursor: _Cursor | None = None  # first row only in the journal (set while the queue overflows)
        self._taken = 0  # rows [_committed, _taken) are in batches being written
        self._mem_taken = 0  # of which this many from the head of _mem
        self._read_at: _Cursor | None = None  # where the next batch read from the journal starts
        self._loose: list[bytes] = []  # recorded before start(), or the journal write failed

        self._wake = asyncio.Event()
        self._wake_at = 0
        self._urgent = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._closed = False

        self._db_ok: bool | None = None
        self._schema_ok = not auto_migrate
        self._written = 0
        self._duplicates = 0
        self._rejected = 0
        self._orphan_bytes = 0
        self._warn_at = _BACKLOG_WARN

    # -- construction from config ------------------------------------------------------------------

    @classmethod
    def from_config(cls, loaded: LoadedConfig) -> UsageLedger:
        s = loaded.settings
        return cls(
            s.database.url,
            s.usage.spool_dir,
            batch_size=s.usage.batch_size,
            flush_interval=s.usage.flush_interval_seconds,
            queue_size=s.usage.queue_size,
            auto_migrate=s.database.auto_migrate,
            table_prefix=s.database.table_prefix,
        )

    @property
    def db(self) -> LedgerDB:
        """The ledger's database, also for reports and stored completions (valid after start())."""
        if self._db is None:
            raise RuntimeError("the usage ledger is not started")
        return self._db

    # -- hot path ----------------------------------------------------------------------------------

    def record(self, event: UsageEvent) -> None:
        try:
            line = _journal_line(event)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            event = _sanitized(event)
            try:
                line = _journal_line(event)
            except TypeError as exc:  # cannot happen after _sanitized(); never let record() raise
                log.error("usage event not serialisable", extra={"request_id": event.request_id, "error": str(exc)})
                return
        seg = self._active
        if seg is None:
            self._record_loose(line)
            return
        offset = seg.size
        end = offset + len(line)
        mm = self._mm
        if mm is not None and end <= self._limit:
            mm[offset:end] = line  # a copy into the page cache: survives a killed process, no system call
        else:
            offset = self._write_slow(line)
            if offset < 0:
                return
            seg = self._active
            assert seg is not None
            end = offset + len(line)
        seg.size = end
        seq = self._seq
        self._seq = seg.end_seq = seq + 1
        if self._cursor is None:
            if len(self._mem) < self._queue_size:
                # A right-sized copy, without the newline: orjson's bytes keep the buffer it grew while
                # serialising (8 KiB for a ~450-byte line with orjson 3.13), which a queue of thousands of
                # lines turned into ~20 MB of resident memory under load.
                self._mem.append(line[:-1])
            else:
                self._cursor = _Cursor(seg, offset, seq)
                log.warning(
                    "usage queue full: the writer now reads from the journal",
                    extra={"queue_size": self._queue_size, "backlog": seq - self._committed},
                )
        if self._wake_at and self._seq - self._committed >= self._wake_at:
            self._wake_at = 0
            self._wake.set()

    def _record_loose(self, line: bytes) -> None:
        if self._closed:
            self._record_late(line)
            return
        self._loose.append(line[:-1])  # right-sized, as in record()
        self._wake.set()

    def _unjournaled(self, line: bytes) -> None:
        self._loose.append(line[:-1])  # right-sized, as in record()
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self._open_own_dir()
        except OSError as exc:
            self._journal_error = self._last_error = f"cannot open journal in {self.spool_dir}: {exc}"
            log.error("usage journal unavailable: events are kept in memory only", extra={"error": str(exc)})
        if self._db is None:
            self._db = open_ledger_db(self.database_url, connections=self._concurrency,
                                      table_prefix=self._table_prefix)
        if self._auto_migrate:
            try:
                await asyncio.wait_for(self._db.migrate(), self._migrate_timeout)
                self._schema_ok = True
                self._set_db_ok(True)
            except Exception as exc:  # the writer retries (or reports) in the background
                self._last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("usage database migration did not complete at start; retrying in the background",
                            extra={"error": self._last_error})
        else:
            await self._ping()
        self._task = asyncio.create_task(self._run(), name="usage-ledger-writer")

    async def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=self._close_timeout)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._finish_close()
        if self._db is not None:
            await self._db.close()

    def _finish_close(self) -> None:
        backlog = self._seq - self._committed
        self._close_active()
        self._closed = True
        if backlog == 0 and self._dir is not None:
            self._remove_own_dir()
        elif backlog:
            log.warning(
                "database unreachable at shutdown: events stay in the journal and are written at next start",
                extra={"backlog": backlog, "journal": str(self._dir), "last_error": self._last_error},
            )
        if self._loose:
            # Neither the journal nor the database took these: the log is the last place to keep them.
            for line in self._loose:
                log.error("usage event could not be stored",
                          extra={"event": _readable(line) or line.decode("utf-8", "replace")})
            self._loose.clear()
        self._unlock()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def flush(self, max_wait: float | None = None) -> bool:
        """Wait until every event recorded so far is in the database; False on timeout."""
        target = self._seq
        if (self._committed >= target and not self._loose) or self._closed:
            return self._committed >= target and not self._loose
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._urgent = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(fut), max_wait)
        except TimeoutError:
            return False
        return self._committed >= target and not self._loose

    async def stored_response(self, response_id: str, subject: str) -> dict[str, Any] | None:
        """A stored Response that `subject` made (ingress/base.py: StoredResponses), or None.

        A client continues a response as soon as it has it, often before the writer committed it: on a miss this
        process's rows are flushed and it is looked up again; then once more after a flush interval, the time
        another worker's (or replica's) writer may still hold it. Raises ServiceUnavailable when the database is
        away."""
        db = self.db
        try:
            row = await db.get_response(response_id, subject=subject)
            if row is None:
                await self.flush(_FLUSH_WAIT)
                row = await db.get_response(response_id, subject=subject)
            if row is None:
                await asyncio.sleep(min(self._interval, _FLUSH_WAIT))
                row = await db.get_response(response_id, subject=subject)
        except Exception as exc:
            log.warning("stored response read failed", extra={"error": f"{type(exc).__name__}: {exc}"[:500]})
            raise ServiceUnavailable("The database of stored responses is unavailable; try again later",
                                     code="usage_database_unavailable") from None
        return row

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,  # the journal keeps events while the database is away: never blocks readiness
            "backend": "database",
            "database": bool(self._db_ok),
            "backlog": self._seq - self._committed + len(self._loose),
            "spool_bytes": self.spool_bytes,
            "last_error": self._last_error,
            "written": self._written,
            "duplicates": self._duplicates,
            "rejected": self._rejected,
            "journal": "ok" if self._journal_error is None else self._journal_error,
        }

    @property
    def spool_bytes(self) -> int:
        """Journal bytes not known to be in the database (this process's segments and a journal being replayed)."""
        return sum(s.size for s in self._segments) - self._active_done + self._orphan_bytes

    @property
    def backlog(self) -> int:
        return self._seq - self._committed + len(self._loose)

    # -- writer ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._work()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("usage writer failed; restarting it")
                await asyncio.sleep(1.0)

    async def _work(self) -> None:
        if not self._schema_ok:
            await self._ensure_schema()
        await self._scan_orphans()
        bs = self._batch_size
        inflight: deque[_Batch] = deque()
        self._taken, self._mem_taken, self._read_at = self._committed, 0, None
        try:
            while True:
                if self._loose and not inflight:
                    batch = self._loose[:bs]
                    await self._write(batch)
                    del self._loose[: len(batch)]
                    self._notify()
                    continue
                # Full batches go out at once, up to `concurrency` in flight; they complete in order.
                while len(inflight) < self._concurrency and (
                    self._seq - self._taken >= bs or (self._seq > self._taken and (self._stopping or self._urgent))
                ):
                    inflight.append(await self._take(bs))
                if inflight:
                    head = inflight[0]
                    await head.task
                    inflight.popleft()
                    self._complete(head)
                    self._check_backlog()
                    continue
                self._urgent = False
                pending = self._seq - self._committed
                if pending == 0:
                    self._check_backlog()
                    if self._stopping:
                        return
                    self._wake.clear()
                    self._wake_at = 1
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._scan_interval)
                    except TimeoutError:  # idle for a while: look for orphaned journals, check the database
                        await self._scan_orphans()
                        await self._ping()
                    self._wake_at = 0
                    continue
                # A partial batch: give it flush_interval to fill up.
                if not (self._stopping or self._urgent):
                    self._wake.clear()
                    self._wake_at = bs
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._interval)
                    self._wake_at = 0
                inflight.append(await self._take(bs))
        finally:
            for b in inflight:
                b.task.cancel()
            await asyncio.gather(*(b.task for b in inflight), return_exceptions=True)

    async def _take(self, bs: int) -> _Batch:
        """Start writing the next rows not yet taken: from the in-memory queue, else from the journal."""
        mem = self._mem
        if self._mem_taken < len(mem):
            lines: list[bytes] = []
            size = 0
            for line in islice(mem, self._mem_taken, self._mem_taken + bs):
                lines.append(line)
                size += len(line)
                if size >= _BATCH_BYTES:
                    break
            self._mem_taken += len(lines)
            end = None
        else:
            at = self._read_at or self._cursor
            if at is None:
                raise RuntimeError("usage ledger: rows pending but neither queued nor journaled")
            while at.offset >= at.seg.size and at.seg.closed:
                at = _Cursor(self._next_segment(at.seg), 0, at.seq)
            lines, consumed = await asyncio.to_thread(_read_lines, at.seg.path, at.offset, at.seg.size, bs)
            if not lines:
                raise RuntimeError("usage ledger: journal shorter than its row count")
            end = self._read_at = _Cursor(at.seg, at.offset + consumed, at.seq + len(lines))
        self._taken += len(lines)
        return _Batch(lines, end, asyncio.create_task(self._write(lines)))

    def _complete(self, batch: _Batch) -> None:
        """A batch is committed (batches complete in the order they were taken)."""
        n = len(batch.lines)
        if batch.end is None:
            for _ in range(n):
                self._mem.popleft()
            self._mem_taken -= n
        else:
            self._cursor = batch.end
        self._committed += n
        cur = self._cursor
        if cur is not None and cur.seq >= self._seq:
            self._cursor = self._read_at = None
            log.info("usage writer caught up with the journal; back to the in-memory queue")
        reading = self._cursor.seg if self._cursor is not None else None
        caught_up = reading is None and self._taken == self._committed == self._seq
        self._collect_segments(self._committed, reading, caught_up)
        self._notify()

    def _notify(self) -> None:
        if not self._waiters:
            return
        keep: list[tuple[int, asyncio.Future[None]]] = []
        done = not self._loose
        for target, fut in self._waiters:
            if done and target <= self._committed:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    def _check_backlog(self) -> None:
        backlog = self.backlog
        if backlog >= self._warn_at:
            log.warning(
                "usage backlog growing",
                extra={"backlog": backlog, "spool_bytes": self.spool_bytes, "database": bool(self._db_ok)},
            )
            while self._warn_at <= backlog:
                self._warn_at *= 2
        elif backlog == 0 and self._warn_at > _BACKLOG_WARN:
            log.info("usage backlog drained", extra={"spool_bytes": self.spool_bytes})
            self._warn_at = _BACKLOG_WARN

    # -- database ----------------------------------------------------------------------------------

    async def _ping(self) -> None:
        try:
            await asyncio.wait_for(self.db.ping(), 5.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._set_db_ok(False, exc)
        else:
            self._set_db_ok(True)

    async def _ensure_schema(self) -> None:
        """Migrate, retrying while the database is unreachable. A migration that fails on a reachable
        database (e.g. no DDL privilege) is reported once and the writer goes on: the tables may exist."""
        db = self.db
        delay = _BACKOFF_MIN
        while True:
            try:
                await db.migrate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                try:
                    await db.ping()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._set_db_ok(False, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                self._last_error = f"migration failed: {type(exc).__name__}: {exc}"[:500]
                log.error("usage database migration failed; run `llm-proxy db upgrade`",
                          extra={"error": self._last_error})
            else:
                self._set_db_ok(True)
            self._schema_ok = True
            return

    def _set_db_ok(self, ok: bool, exc: BaseException | None = None) -> None:
        if ok:
            if self._db_ok is False:
                log.info("usage database reachable again", extra={"backlog": self.backlog})
            self._db_ok = True
            return
        self._last_error = f"{type(exc).__name__}: {exc}"[:500]
        if self._db_ok is not False:
            log.warning(
                "usage database unreachable; events wait in the journal",
                extra={"error": self._last_error, "backlog": self.backlog},
            )
        self._db_ok = False

    async def _write(self, lines: list[bytes]) -> None:
        """Insert journal lines, retrying while the database is away; rows it rejects go to rejected.jsonl."""
        if not lines:
            return
        db = self.db
        delay = _BACKOFF_MIN
        while True:
            try:
                added = await db.insert_lines(lines)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if db.is_row_error(exc):
                    self._set_db_ok(True)
                    await self._bisect(lines, exc)
                    return
                self._set_db_ok(False, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            self._set_db_ok(True)
            self._written += added
            self._duplicates += len(lines) - added
            return

    async def _bisect(self, lines: list[bytes], exc: BaseException) -> None:
        if len(lines) == 1:
            self._reject(lines[0], exc)
            return
        mid = len(lines) // 2
        await self._write(lines[:mid])
        await self._write(lines[mid:])

    def _reject(self, line: bytes, exc: BaseException) -> None:
        record: dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        event = _readable(line)
        if event is not None:
            record["event"] = event
        else:
            record["line"] = line.decode("utf-8", "replace")
        rid = record["event"].get("request_id") if isinstance(record.get("event"), dict) else None
        log.error("usage row rejected by the database; kept in rejected.jsonl",
                  extra={"request_id": rid, "error": record["error"][:300]})
        self._dead_letter(record)

    def _dead_letter(self, record: dict[str, Any]) -> None:
        self._rejected += 1
        record["rejected_at"] = time.time()
        data = orjson.dumps(record, default=_default, option=_OPTS)
        try:
            fd = os.open(self.spool_dir / _REJECTED, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot write rejected.jsonl", extra={"error": str(exc), "record": data.decode()})

    # -- journals left behind by other processes ---------------------------------------------------

    async def _scan_orphans(self) -> None:
        for d in self._orphan_dirs():
            with _orphan_lock(d) as locked:
                if locked:  # else removed meanwhile, or a live process owns it
                    await self._replay_dir(d)

    async def _replay_dir(self, d: Path) -> None:
        segs = await asyncio.to_thread(_list_segments, d)
        total = sum(size for _, size in segs)
        if total:
            log.info("replaying usage journal left by an earlier process", extra={"journal": str(d), "bytes": total})
        self._orphan_bytes = total
        rows = 0
        for path, size in segs:
            offset = 0
            while offset < size:
                lines, consumed = await asyncio.to_thread(_read_lines, path, offset, size, self._batch_size)
                if not lines:
                    # A last line without its newline (the process died inside a write): keep it aside.
                    tail = await asyncio.to_thread(_read_tail, path, offset, size)
                    self._reject(tail, ValueError("incomplete journal line"))
                    break
                await self._write(lines)
                rows += len(lines)
                offset += consumed
                self._orphan_bytes = max(0, self._orphan_bytes - consumed)
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._orphan_bytes = 0
        await asyncio.to_thread(_remove_dir, d)
        if rows:
            log.info("usage journal replayed", extra={"journal": str(d), "rows": rows})
