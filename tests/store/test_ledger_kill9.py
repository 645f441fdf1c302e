"""kill -9 of a serving proxy under load, then a restart: every completed request's row is there exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest_asyncio

from llm_proxy.store.db import create_engine
from llm_proxy.store.repos import UsageRepo

from ..conftest import Emulator
from .dbutil import config_text, eventually, free_port

COMPLETED_BEFORE_KILL = 150
WORKERS = 12


@pytest_asyncio.fixture(scope="module")
async def repo(db_url: str) -> AsyncIterator[UsageRepo]:
    engine = create_engine(db_url)
    yield UsageRepo(engine)
    await engine.dispose()


class Server:
    """`python -m llm_proxy serve` as a child process; stderr is drained so it never blocks."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llm_proxy", "serve", "--config", str(self.config), "--port", str(self.port),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        listening = asyncio.get_running_loop().create_future()
        self._drain = asyncio.create_task(self._read(listening))
        await asyncio.wait_for(listening, 20)

    async def _read(self, listening: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if '"listening"' in line and not listening.done():
                listening.set_result(None)
        if not listening.done():
            listening.set_exception(RuntimeError("server exited:\n" + "".join(self.lines[-20:])))

    async def stop(self, sig: int) -> int:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if self._drain is not None:
            await self._drain
        return code


async def test_kill9_under_load_then_restart(emulator: Emulator, db_url: str, tmp_path: Path,
                                            repo: UsageRepo) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    cfg = tmp_path / "config.yaml"
    # Slow batching: when the kill comes the journal holds committed rows (replayed again: idempotent)
    # and rows the database has not seen yet.
    cfg.write_text(config_text(emulator.base_url, db_url, spool, port=port, flush_interval=0.3, batch_size=64))
    before = set(await repo.event_ids())

    server = Server(cfg, port)
    await server.start()
    completed: list[str] = []
    attempted = 0
    enough = asyncio.Event()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=10)

    async def worker(n: int) -> None:
        nonlocal attempted
        i = 0
        while not enough.is_set():
            i += 1
            attempted += 1
            try:
                if (n + i) % 2:
                    raw = await client.chat.completions.with_raw_response.create(
                        model="openai/gpt-4o", messages=[{"role": "user", "content": f"w{n} r{i}"}])
                    raw.parse()
                    completed.append(raw.headers["x-request-id"])
                else:
                    sraw = await client.chat.completions.with_raw_response.create(
                        model="openai/gpt-4o", messages=[{"role": "user", "content": f"w{n} r{i}"}], stream=True)
                    rid = sraw.headers["x-request-id"]
                    async for _ in sraw.parse():
                        pass
                    completed.append(rid)  # the whole stream, [DONE] included, reached the client
            except openai.APIError:
                return  # the server died under this request
            if len(completed) >= COMPLETED_BEFORE_KILL:
                enough.set()

    workers = [asyncio.create_task(worker(n)) for n in range(WORKERS)]
    await enough.wait()
    assert await server.stop(signal.SIGKILL) == -signal.SIGKILL  # with requests in flight
    await asyncio.gather(*workers)
    killed_with = set(completed)
    journals = [p for p in spool.rglob("seg-*.jsonl")]
    assert journals, "the killed process left its journal behind"
    assert sum(p.stat().st_size for p in journals) > 0

    in_db_at_kill = len(killed_with & set(await repo.event_ids()))
    print(f"\nkill -9 after {len(killed_with)} completed requests; {in_db_at_kill} of them were in the database")
    restarted = Server(cfg, port)
    await restarted.start()

    async def all_there() -> bool:
        return killed_with <= set(await repo.event_ids())

    await eventually(all_there, 30)  # replayed from the dead process's journal
    new = set(await repo.event_ids()) - before
    # every completed request exactly once (request_id is the primary key); at most the requests that were
    # in flight at the kill may have a row without the client having seen their answer
    assert killed_with <= new
    assert len(new) - len(killed_with) <= attempted - len(killed_with)
    assert await restarted.stop(signal.SIGTERM) == 0
    await client.close()
    assert [p for p in spool.rglob("*") if p.is_file()] == []  # replayed, committed, journal removed
    if in_db_at_kill < len(killed_with):
        # Rows were missing at the kill: they came from the journal (when the writer had committed everything
        # before the kill, the journal holds no line to replay and the restart says nothing about it).
        assert any('"usage journal replayed"' in line for line in restarted.lines)
