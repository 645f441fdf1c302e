"""Stored Responses behind the real proxy, on PostgreSQL and SQLite (usage.store_completions on): `store: true`
keeps a response under its id, `previous_response_id` continues it (non-streamed and streamed, chained), only for
the caller who made it, and GET /v1/responses/{id} reads it back; the official openai SDK all along."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config
from .dbutil import config_text
from .test_ledger_proxy import sdk, start_proxy

MODEL = "openai/gpt-4o"  # type openai: the emulator gets /v1/responses as the client sent it
TRANSLATED = "compat/gpt-4o"  # native_client_api: false: the emulator gets the chat translation


@pytest.fixture(scope="module")
def proxy(emulator: Emulator, db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    spool = tmp_path_factory.mktemp("spool")
    # A long flush interval: a continuation arrives before the writer's next batch, so the read must flush.
    # native_client_api: true: a type openai on another base URL than OpenAI's is translated by default.
    text = config_text(emulator.base_url, db_url, spool, flush_interval=30).replace(
        "api_key: sk-upstream}", "api_key: sk-upstream, native_client_api: true}", 1).replace("models:\n", f"""\
  - {{id: compat, type: openai, base_url: "{emulator.base_url}", api_key: sk-upstream, native_client_api: false}}
models:
  - {{id: {TRANSLATED}, provider: compat, upstream_model: gpt-4o}}
""")
    with start_proxy(native_config(text)) as px:
        yield px


def upstream_messages(emulator: Emulator) -> list[dict[str, Any]]:
    """The conversation of the upstream's last request, as chat messages: its `messages` (translated), or its
    Responses `input` (passed through: then the stored conversation is in it, not a previous_response_id)."""
    body = emulator.requests()[-1]["json"]
    if "messages" in body:
        messages: list[dict[str, Any]] = body["messages"]
        return messages
    assert "previous_response_id" not in body and body["store"] is False
    out = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    for item in body["input"]:
        assert item.get("type", "message") == "message"
        out.append({"role": item["role"], "content": item["content"]})
    return out


@pytest.mark.parametrize("model", [MODEL, TRANSLATED])
async def test_previous_response_id_continues_a_stored_response(proxy: ProxyServer, emulator: Emulator,
                                                                model: str) -> None:
    frank = sdk(proxy, "frank")
    first = await frank.responses.create(model=model, instructions="Be terse.", input="first question", store=True)
    assert first.status == "completed" and first.output_text
    second = await frank.responses.create(model=model, previous_response_id=first.id, input="second question",
                                          store=True)
    assert second.previous_response_id == first.id and second.id != first.id
    assert ("messages" in emulator.requests()[-1]["json"]) == (model == TRANSLATED)  # passed through or not
    # The stored conversation went before the new input; the first request's instructions did not carry over.
    assert upstream_messages(emulator) == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "second question"},
    ]

    # Streamed, continuing the continuation: the id response.completed carries is the one stored.
    async with frank.responses.stream(model=model, previous_response_id=second.id, input=[
            {"role": "user", "content": "third question"}], store=True) as stream:
        third = await stream.get_final_response()
    assert third.previous_response_id == second.id
    fourth = await frank.responses.create(model=model, previous_response_id=third.id, input="fourth question",
                                          instructions="Be kind.")
    assert upstream_messages(emulator) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "third question"},
        {"role": "assistant", "content": third.output_text},
        {"role": "user", "content": "fourth question"},
    ]

    # Not stored (store defaults to false): nothing to continue from.
    with pytest.raises(openai.NotFoundError) as e:
        await frank.responses.create(model=model, previous_response_id=fourth.id, input="x")
    assert isinstance(e.value.body, dict)
    assert (e.value.body["code"], e.value.body["param"]) == ("previous_response_not_found", "previous_response_id")

    # GET /v1/responses/{id}: the stored Response, as the client got it.
    again = await frank.responses.retrieve(third.id)
    assert again.id == third.id and again.output_text == third.output_text and again.usage == third.usage
    with pytest.raises(openai.NotFoundError):
        await frank.responses.retrieve(fourth.id)
    await frank.close()


async def test_another_callers_response_does_not_exist(proxy: ProxyServer, emulator: Emulator) -> None:
    frank, gina = sdk(proxy, "frank"), sdk(proxy, "gina")
    secret = await frank.responses.create(model=MODEL, input="frank's private question", store=True)
    before = len(emulator.requests())
    with pytest.raises(openai.NotFoundError) as e:
        await gina.responses.create(model=MODEL, previous_response_id=secret.id, input="what did frank ask?")
    assert e.value.status_code == 404 and "private" not in e.value.response.text
    assert isinstance(e.value.body, dict) and e.value.body["type"] == "invalid_request_error"
    assert len(emulator.requests()) == before  # refused before any upstream call
    with pytest.raises(openai.NotFoundError) as r:
        await gina.responses.retrieve(secret.id)
    assert "private" not in r.value.response.text
    for c in (frank, gina):
        await c.close()

    # The chat completion routes list chat completions only, not the responses kept beside them.
    async with aiohttp.ClientSession(proxy.url) as http, http.get(
            "/v1/chat/completions?limit=100", headers={"x-test-user": "frank"}) as resp:
        page = orjson.loads(await resp.read())
        assert resp.status == 200 and all(c["object"] == "chat.completion" for c in page["data"])
        async with http.get(f"/v1/chat/completions/{secret.id}", headers={"x-test-user": "frank"}) as one:
            assert one.status == 404
