"""An upstream stream cut short after the headers went out: each agent API tells its client in its own in-band
error (Responses: `error` then `response.failed`; Messages: Anthropic's `error` event, which the SDK raises), and
the usage row says so (502, the client API named)."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from llm_proxy.types import UsageEvent

from ..conftest import Emulator, basic_config
from ..core.test_resilience_e2e import RecordingSink
from ..helpers import ProxyServer, native_config
from . import sdk


@pytest.fixture()
def proxy(emulator: Emulator) -> Iterator[ProxyServer]:
    with ProxyServer(native_config(basic_config(emulator.base_url)), usage=RecordingSink()) as px:
        yield px


def _row(proxy: ProxyServer, client_api: str) -> UsageEvent:
    """The failed stream's row (recorded just after its in-band error reached the client)."""
    sink = proxy.services.usage
    assert isinstance(sink, RecordingSink)
    return sink.wait(lambda e: e.client_api == client_api and e.status != 200)


def test_responses_stream_cut(proxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script({"responses": [{"content": "a b c d e f", "disconnect_after_chunks": 2}]})
    with openai.OpenAI(base_url=proxy.base_url, api_key="any", max_retries=0) as client:
        events = list(client.responses.create(model="openai/gpt-4o", input="hi", stream=True))
    sdk.responses_events(b"".join(sdk.sse_bytes(e.model_dump(mode="json", exclude_unset=True)) for e in events))
    assert [e.type for e in events][:2] == ["response.created", "response.in_progress"]
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"
    assert failed.output and failed.output[0].status == "incomplete"
    row = _row(proxy, "openai.responses")
    assert row.status == 502 and row.streamed


def test_messages_stream_cut(proxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script({"responses": [{"content": "a b c d e f", "disconnect_after_chunks": 2}]})
    with anthropic.Anthropic(base_url=proxy.url, api_key="any", max_retries=0) as client, \
            pytest.raises(anthropic.APIStatusError) as err, \
            client.messages.stream(model="openai/gpt-4o", max_tokens=20,
                                   messages=[{"role": "user", "content": "hi"}]) as stream:
        for _ in stream:
            pass
    assert isinstance(err.value.body, dict) and err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "api_error"
    row = _row(proxy, "anthropic.messages")
    assert row.status == 502 and row.streamed
