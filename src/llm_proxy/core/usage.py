"""The usage ledger: every event is journaled to a local append-only file, then batched into the database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import secrets
import time
from collections import deque
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

from ..config import LoadedConfig
from ..store.connect import open_ledger_db
from ..store.ledger_db import JOURNAL_FIELDS, LedgerDB, event_from_line, line_fields, parse_db_url
from ..types import UsageEvent

log = logging.getLogger("llm_proxy.usage")

_OPTS = orjson.OPT_APPEND_NEWLINE  # (OPT_NON_STR_KEYS halves the speed; _sanitized() covers such keys)
_INT_FIELDS = ("status", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "attempts")
_INT8_MAX = 2**63 - 1
_DIR_PREFIX = "ledger-"
_LOCK = ".lock"
_SEG_PREFIX = "seg-"
_SEG_SUFFIX = ".jsonl"
_REJECTED = "rejected.jsonl"
_READ_CHUNK = 1 << 20
_BATCH_BYTES = 32 << 20  # a batch also stops here (stored completions can make lines large)
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 5.0
_BACKLOG_WARN = 1000
_TRIM_BYTES = 1 << 20  # a journal mapping keeps at most about this much of it resident
_ZEROS = bytes(_TRIM_BYTES)
_CAN_MAP = hasattr(os, "posix_fallocate")  # Linux: the journal is written through a mapping


def _default(value: Any) -> Any:
    return str(value)


def _journal_line(e: UsageEvent) -> bytes:
    """One journal line: the event's fields as a JSON array, in the order of JOURNAL_FIELDS."""
    return orjson.dumps(
        (e.request_id, e.started_at, e.ended_at, e.endpoint, e.status, e.subject, e.username, e.model, e.provider_id,
         e.upstream_model, e.streamed, e.error_type, e.prompt_tokens, e.completion_tokens, e.total_tokens,
         e.cached_tokens, e.latency_ms, e.ttft_ms, e.upstream_latency_ms, e.attempts, e.extra, e.usage_estimated,
         e.cost_usd, e.groups, e.client_api),
        default=_default,
        option=_OPTS,
    )  # fmt: skip


if len(JOURNAL_FIELDS) != 25:  # _journal_line() lists them by hand (a tuple: faster than a loop)
    raise RuntimeError("UsageEvent changed: update _journal_line() and append the new fields at the end")


def _readable(line: bytes) -> Any:
    """A journal line as a JSON object keyed by field name (for logs and rejected.jsonl), else None."""
    try:
        return line_fields(orjson.loads(line))
    except (orjson.JSONDecodeError, ValueError):
        return None


def _clamp(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(-_INT8_MAX, min(value, _INT8_MAX))
    return value


def _sanitized(event: UsageEvent) -> UsageEvent:
    """A JSON-safe copy of an event orjson refused (an integer beyond 64 bits, an odd `extra`)."""
    changes: dict[str, Any] = {f: _clamp(getattr(event, f)) for f in _INT_FIELDS}
    try:
        extra = orjson.loads(orjson.dumps(event.extra, default=repr, option=orjson.OPT_NON_STR_KEYS))
    except (TypeError, orjson.JSONEncodeError):
        extra = {"unserializable": repr(event.extra)[:2000]}
    changes["extra"] = extra
    return dataclasses.replace(event, **changes)


def _read_lines(path: str, offset: int, limit: int, max_lines: int) -> tuple[list[bytes], int]:
    """Complete lines of `path` from `offset`, never past byte `limit`; returns (lines, bytes consumed).

    Stops after `max_lines` lines or about _BATCH_BYTES bytes, whichever comes first."""
    lines: list[bytes] = []
    consumed = 0
    buf = b""
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        while len(lines) < max_lines and pos < limit and consumed < _BATCH_BYTES:
            chunk = f.read(min(_READ_CHUNK, limit - pos))
            if not chunk:
                break
            pos += len(chunk)
            buf += chunk
            start = 0
            while len(lines) < max_lines:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                lines.append(buf[start:nl])
                consumed += nl + 1 - start
                start = nl + 1
            buf = buf[start:]
    return lines, consumed


@dataclasses.dataclass(slots=True, eq=False)
class _Segment:
    path: str
    first_seq: int
    end_seq: int
    size: int = 0
    closed: bool = False


@dataclasses.dataclass(slots=True)
class _Cursor:
    """A position in this process's journal: a segment, a byte offset in it, and the row number there."""

    seg: _Segment
    offset: int
    seq: int


@dataclasses.dataclass(slots=True, eq=False)
class _Batch:
    """Rows being written: from the in-memory queue, or read back from the journal (then `end` is where
    the rows after it start)."""

    lines: list[bytes]
    end: _Cursor | None
    task: asyncio.Task[None]


class UsageLedger:
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
        self._table_prefix = table_prefix
        # Batches in flight at once. PostgreSQL: two, so one backend works while the next batch travels (and
        # a second core helps); SQLite serialises writers anyway.
        self._concurrency = concurrency or (1 if url.backend == "sqlite" else 2)
        self.database_url = database_url
        self.spool_dir = Path(spool_dir)
        self._batch_size = batch_size
        self._interval = flush_interval
        self._queue_size = queue_size
        self._auto_migrate = auto_migrate
        self._segment_bytes = segment_bytes
        self._close_timeout = close_timeout
        self._migrate_timeout = migrate_timeout
        self._scan_interval = orphan_scan_interval
        self._db: LedgerDB | None = None  # asyncpg / aiosqlite directly: no SQLAlchemy on the write path

        self._dir: Path | None = None
        self._lock_fd = -1
        self._fd = -1
        self._mm: mmap.mmap | None = None  # the active segment's reserved space, mapped
        self._cap = 0  # bytes of it
        self._limit = 0  # record() copies lines ending at or below this offset straight into the mapping
        self._active_done = 0  # bytes at the start of the active segment known to be committed
        self._trimmed = 0  # mapped pages below this offset were let go (_trim)
        self._segments: deque[_Segment] = deque()
        self._active: _Segment | None = None
        self._seq = 0  # rows journaled by this process
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
        self._late_fd = -1
        self._late_lock_fd = -1

        self._db_ok: bool | None = None
        self._schema_ok = not auto_migrate
        self._last_error: str | None = None
        self._journal_error: str | None = None
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

    def _write_slow(self, line: bytes) -> int:
        """record()'s write when the line does not fit below the mapping's fast-path limit: past a trim point,
        into a new segment, or with pwrite. Returns the line's offset in the (then) active segment, -1 when
        the journal failed (the line is then kept in memory)."""
        rotated = False
        while True:
            seg = self._active
            assert seg is not None
            offset = seg.size
            end = offset + len(line)
            mm = self._mm
            if mm is not None and end <= self._cap:
                self._trim(offset)
                mm[offset:end] = line
                return offset
            if rotated or not offset or end <= self._segment_bytes:
                break
            self._rotate()
            rotated = True
        return offset if self._pwrite(seg, line) else -1

    def _trim(self, offset: int) -> None:
        """Let go of the mapped pages behind `offset` (they stay in the page cache, dirty until written back:
        the journal's contents are unaffected), so that a worker's resident memory does not grow by a whole
        segment; the next call is due _TRIM_BYTES further on."""
        page = offset - offset % mmap.PAGESIZE
        if page > self._trimmed and self._mm is not None:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, self._trimmed, page - self._trimmed)
            except (OSError, ValueError):  # only memory accounting is at stake
                pass
            self._trimmed = page
        self._limit = min(self._cap, (offset // _TRIM_BYTES + 1) * _TRIM_BYTES)

    def _pwrite(self, seg: _Segment, line: bytes) -> bool:
        """The journal write without a mapping (none could be set up, or a line larger than a segment)."""
        offset = seg.size
        try:
            n = os.pwrite(self._fd, line, offset)
        except OSError as exc:
            self._journal_failed(line, exc)
            return False
        if n != len(line):  # a short write (disk full): cut the partial line off again
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)
            self._journal_failed(line, OSError(f"short write to {seg.path}"))
            return False
        return True

    def _journal_failed(self, line: bytes, exc: OSError) -> None:
        msg = f"journal write failed: {exc}"
        if self._journal_error != msg:
            log.error("usage journal write failed; keeping events in memory", extra={"error": str(exc)})
        self._journal_error = self._last_error = msg
        self._loose.append(line[:-1])
        self._wake.set()

    def _record_late(self, line: bytes) -> None:
        """An event after close(): journal it in a new directory that the next start replays."""
        try:
            if self._late_fd < 0:
                # Locked until this process exits (the lock is never released explicitly), so that no
                # other process replays and deletes it while lines may still be appended.
                late, self._late_lock_fd = self._new_locked_dir("late-")
                self._late_fd = os.open(
                    late / f"{_SEG_PREFIX}{0:012d}{_SEG_SUFFIX}",
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                    0o600,
                )
            os.write(self._late_fd, line)
        except OSError as exc:
            log.error("usage event after shutdown could not be journaled", extra={"error": str(exc),
                                                                                  "event": line.decode()})

    def _open_segment(self, first_seq: int) -> None:
        assert self._dir is not None
        path = str(self._dir / f"{_SEG_PREFIX}{first_seq:012d}{_SEG_SUFFIX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        seg = _Segment(path, first_seq, first_seq, os.fstat(fd).st_size)
        self._close_active()
        self._fd = fd
        self._active = seg
        self._active_done = 0
        self._segments.append(seg)
        self._map()

    def _map(self) -> None:
        """Map the active segment's reserved space: record() then copies each line into it.

        The space is allocated first (posix_fallocate), so a write into the mapping can never meet a full
        disk (which would kill the process with SIGBUS). The tail past the last line reads as NUL bytes,
        which no journal line contains: readers stop there. Where space cannot be reserved (a full disk, a
        file system without fallocate) record() writes with pwrite instead."""
        seg = self._active
        if seg is None or not _CAN_MAP or self._segment_bytes <= seg.size:
            return
        cap = self._segment_bytes
        try:
            os.posix_fallocate(self._fd, 0, cap)
            self._mm = mmap.mmap(self._fd, cap, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            self._mm, self._cap, self._limit = None, 0, 0
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                log.warning("usage journal: cannot reserve segment space; writing without a mapping",
                            extra={"path": seg.path, "error": str(exc)})
            return
        self._cap = cap
        self._trimmed = 0
        self._trim(seg.size)

    def _unmap(self) -> None:
        mm, self._mm, self._cap, self._limit = self._mm, None, 0, 0
        if mm is not None:
            mm.close()

    def _close_active(self) -> None:
        """Close the active segment: unmapped and cut to its lines (no reserved NUL tail left behind)."""
        seg, fd = self._active, self._fd
        self._unmap()
        if fd >= 0:
            if seg is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, seg.size)
            os.close(fd)
        self._fd = -1
        if seg is not None:
            seg.closed = True
        self._active = None

    def _rotate(self) -> None:
        try:
            self._open_segment(self._seq)
        except OSError as exc:  # keep appending to the current segment (with pwrite past its mapping)
            self._journal_error = self._last_error = f"journal rotation failed: {exc}"
            log.error("usage journal rotation failed", extra={"error": str(exc)})

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

    def _new_locked_dir(self, tag: str = "") -> tuple[Path, int]:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        name = f"{_DIR_PREFIX}{tag}{os.getpid()}-{secrets.token_hex(4)}"
        tmp = self.spool_dir / f".{name}"
        tmp.mkdir()
        fd = os.open(tmp / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        final = self.spool_dir / name
        os.rename(tmp, final)  # only now visible to other processes' orphan scans, already locked
        return final, fd

    def _open_own_dir(self) -> None:
        self._dir, self._lock_fd = self._new_locked_dir()
        self._open_segment(0)

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
            for seg in self._segments:
                with contextlib.suppress(OSError):
                    os.unlink(seg.path)
            self._segments.clear()
            with contextlib.suppress(OSError):
                os.unlink(self._dir / _LOCK)
            with contextlib.suppress(OSError):
                self._dir.rmdir()
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
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
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

    def _next_segment(self, seg: _Segment) -> _Segment:
        it = iter(self._segments)
        for s in it:
            if s is seg:
                return next(it)
        raise RuntimeError("journal segment list lost its order")

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
        self._collect_segments()
        self._notify()

    def _collect_segments(self) -> None:
        """Delete closed segments whose rows are all committed; empty the active one when caught up."""
        segs = self._segments
        reading = self._cursor.seg if self._cursor is not None else None
        while segs and segs[0].closed and segs[0].end_seq <= self._committed and segs[0] is not reading:
            seg = segs.popleft()
            try:
                os.unlink(seg.path)
            except OSError as exc:
                log.warning("cannot delete journal segment", extra={"path": seg.path, "error": str(exc)})
        active = self._active
        if active is not None and active.size and self._taken == self._committed == self._seq and self._cursor is None:
            if self._mm is not None:
                if active.size > _TRIM_BYTES:
                    # Zeroing more would hold the event loop for over ~0.1 ms: the segment goes on filling up
                    # and is deleted once full and committed (a replay after kill -9 re-inserts its committed
                    # rows, which the database ignores).
                    self._active_done = active.size
                    return
                self._clear_mapped(active.size)
            else:
                try:
                    os.ftruncate(self._fd, 0)
                except OSError as exc:
                    log.warning("cannot truncate journal segment", extra={"path": active.path, "error": str(exc)})
                    return
            active.size = 0
            active.first_seq = self._seq
            self._active_done = 0

    def _clear_mapped(self, size: int) -> None:
        """Empty the mapped active segment in place: its first byte becomes NUL (from then on it reads as empty),
        then the rest of its lines are zeroed, so the invariant "NUL right after the last line" holds for what is
        written next. Not truncated and reserved again: that changes file system metadata, and the first write
        into the new space then waited 1-3 ms (the file system's journal) inside record()."""
        mm = self._mm
        assert mm is not None
        mm[0] = 0
        mm[1:size] = memoryview(_ZEROS)[: size - 1]  # size <= _TRIM_BYTES (_collect_segments)
        self._trimmed = 0
        self._trim(0)

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

    def _orphan_dirs(self) -> list[Path]:
        try:
            entries = sorted(self.spool_dir.iterdir())
        except OSError:
            return []
        return [p for p in entries if p.name.startswith(_DIR_PREFIX) and p != self._dir and p.is_dir()]

    async def _scan_orphans(self) -> None:
        for d in self._orphan_dirs():
            try:
                fd = os.open(d / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                continue  # removed meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process owns it
                await self._replay_dir(d)
            finally:
                os.close(fd)

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


def _list_segments(d: Path) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(_SEG_PREFIX):
            with contextlib.suppress(OSError):
                out.append((str(p), _journal_size(str(p))))
    return out


def _journal_size(path: str) -> int:
    """Bytes of journal in a segment file: up to its first NUL byte (a segment of a process that died keeps its
    reserved tail of NULs, which no journal line contains), else the whole file."""
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            nul = chunk.find(0)
            if nul >= 0:
                return size + nul
            size += len(chunk)
    return size


def _read_tail(path: str, offset: int, limit: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(max(0, limit - offset))


def _remove_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(d / _LOCK)
    with contextlib.suppress(OSError):
        d.rmdir()


def iter_journal(path: str | os.PathLike[str]) -> Iterable[UsageEvent]:
    """Events of one journal segment file (for tools and tests)."""
    with open(path, "rb") as f:
        data = f.read(_journal_size(str(path)))
    for line in data.splitlines():
        if line.strip():
            yield event_from_line(line)
