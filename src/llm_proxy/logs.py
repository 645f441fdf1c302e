"""Structured one-line JSON logging; callers pass fields, never headers, tokens or keys."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

import orjson

# ".000Z" ... ".999Z": a line's milliseconds by index (a format with a width per line cost ~0.4 us).
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class AccessLog:
    """The per-request log line, written without the logging module's per-record overhead.

    Lines are buffered and written with one os.write per flush: when 64 KiB are pending or 200 ms after
    the first pending line (so a killed process loses at most that much access log; the usage ledger is
    the durable record). Same JSON shape as JsonFormatter's lines.
    """

    __slots__ = ("_buf", "_fd", "_flush_bytes", "_interval", "_prefix", "_scheduled", "_sec", "_size")

    def __init__(self, fd: int = 2, flush_bytes: int = 65536, interval: float = 0.2) -> None:
        self._fd = fd
        self._flush_bytes = flush_bytes
        self._interval = interval
        self._buf: list[bytes] = []
        self._size = 0
        self._sec = -1
        self._prefix = ""
        self._scheduled = False

    def _ts(self) -> str:
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return self._prefix + _MILLIS[int((now - sec) * 1000)]

    def log(self, fields: dict[str, Any]) -> None:
        self._add(orjson.dumps(
            {"ts": self._ts(), "level": "info", "logger": "llm_proxy.access", "msg": "request", **fields},
            default=str,
        ))

    def request(self, request_id: str, method: str, path: str, status: int, latency_ms: float, model: str | None,
                subject: str | None, error_type: str | None) -> None:
        """The middleware's line (the fields log() would get, in the same order): one dict, built here."""
        self._add(orjson.dumps(
            {"ts": self._ts(), "level": "info", "logger": "llm_proxy.access", "msg": "request",
             "request_id": request_id, "method": method, "path": path, "status": status, "latency_ms": latency_ms,
             "model": model, "subject": subject, "error_type": error_type},
            default=str,
        ))

    def _add(self, line: bytes) -> None:
        self._buf.append(line)
        self._size += len(line) + 1
        if self._size >= self._flush_bytes:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_later(self._interval, self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop: write now
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        data = b"\n".join(self._buf) + b"\n"
        self._buf.clear()
        self._size = 0
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError:  # stderr gone: never let logging break a request
            pass
