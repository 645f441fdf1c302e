"""This process's usage journal: mapped, segmented append-only files in a locked directory under spool_dir."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import secrets
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..types import UsageEvent
from .journal_format import event_from_line

log = logging.getLogger("llm_proxy.usage")

_DIR_PREFIX = "ledger-"
_LOCK = ".lock"
_SEG_PREFIX = "seg-"
_SEG_SUFFIX = ".jsonl"
_READ_CHUNK = 1 << 20
_BATCH_BYTES = 32 << 20  # a batch also stops here (stored completions can make lines large)
_TRIM_BYTES = 1 << 20  # a journal mapping keeps at most about this much of it resident
_ZEROS = bytes(_TRIM_BYTES)
_CAN_MAP = hasattr(os, "posix_fallocate")  # Linux: the journal is written through a mapping


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


class Journal:
    """The journal half of the usage ledger (core/usage.py:UsageLedger, whose record() copies a line into the
    active segment's mapping itself, on the hot path, and leaves the rest to _write_slow()).

    One locked directory per process under spool_dir holds segment files named after their first row; the
    active segment's space is reserved and mapped, closed ones are cut to their lines. Rows are numbered in the
    order journaled (`_seq`); the ledger says which are committed (_collect_segments).
    """

    def __init__(self, spool_dir: str | os.PathLike[str], segment_bytes: int) -> None:
        self.spool_dir = Path(spool_dir)
        self._segment_bytes = segment_bytes
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
        self._late_fd = -1
        self._late_lock_fd = -1
        self._last_error: str | None = None  # the latest error, the journal's or (set by the ledger) the database's
        self._journal_error: str | None = None

    def _unjournaled(self, line: bytes) -> None:
        """Keep a line the journal could not take (the ledger queues it in memory)."""
        raise NotImplementedError

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
        self._unjournaled(line)

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

    def _remove_own_dir(self) -> None:
        """Delete this process's journal directory (every row in it is committed)."""
        assert self._dir is not None
        for seg in self._segments:
            with contextlib.suppress(OSError):
                os.unlink(seg.path)
        self._segments.clear()
        with contextlib.suppress(OSError):
            os.unlink(self._dir / _LOCK)
        with contextlib.suppress(OSError):
            self._dir.rmdir()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _next_segment(self, seg: _Segment) -> _Segment:
        it = iter(self._segments)
        for s in it:
            if s is seg:
                return next(it)
        raise RuntimeError("journal segment list lost its order")

    def _collect_segments(self, committed: int, reading: _Segment | None, caught_up: bool) -> None:
        """Delete closed segments whose rows are all committed (below `committed`) but the one being read back
        (`reading`); empty the active one when `caught_up` (every row journaled is committed, none read back)."""
        segs = self._segments
        while segs and segs[0].closed and segs[0].end_seq <= committed and segs[0] is not reading:
            seg = segs.popleft()
            try:
                os.unlink(seg.path)
            except OSError as exc:
                log.warning("cannot delete journal segment", extra={"path": seg.path, "error": str(exc)})
        active = self._active
        if active is not None and active.size and caught_up:
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

    def _orphan_dirs(self) -> list[Path]:
        try:
            entries = sorted(self.spool_dir.iterdir())
        except OSError:
            return []
        return [p for p in entries if p.name.startswith(_DIR_PREFIX) and p != self._dir and p.is_dir()]


@contextlib.contextmanager
def _orphan_lock(d: Path) -> Iterator[bool]:
    """Lock a journal directory another process left, for its replay: True while held; False when it was removed
    meanwhile or a live process owns it."""
    try:
        fd = os.open(d / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        fd = -1  # removed meanwhile
    if fd < 0:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False  # a live process owns it
        yield locked
    finally:
        os.close(fd)


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
