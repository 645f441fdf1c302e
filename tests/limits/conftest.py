from __future__ import annotations

from collections.abc import Iterator

import pytest

from .redisutil import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def fresh_redis(redis_server: RedisServer) -> RedisServer:
    """The module's Redis, running and empty."""
    if redis_server.proc is None:
        redis_server.start()
    with redis_server.client() as c:
        c.flushall()
    return redis_server
