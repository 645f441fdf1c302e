"""OpenTelemetry traces (tracing.enabled): a span per request with GenAI attributes, a child per upstream attempt,
the client's traceparent continued and the attempt's passed upstream. Spans are read from the SDK's in-memory
exporter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llm_proxy.core.tracing import Tracing

from .conftest import Emulator, basic_config
from .helpers import ProxyServer, native_config

MSG = [{"role": "user", "content": "hi"}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"

EXTRA = """
models:
  - {id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o}
  - {id: openai/text-embedding-3-small, provider: openai, upstream_model: text-embedding-3-small, type: embedding}
  - id: openai/retried
    deployments: [{provider: openai, upstream_model: gpt-4o}, {provider: openai, upstream_model: gpt-4o-mini}]
    retry: {max_attempts: 2, base_delay: 0.01}
"""


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def tproxy(emulator: Emulator, spans: InMemorySpanExporter) -> Iterator[ProxyServer]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    text = basic_config(emulator.base_url).split("models:")[0] + EXTRA + "default_model: openai/gpt-4o\n" + \
        "auth: {mode: none, allow_unauthenticated: true}\n"
    with ProxyServer(native_config(text), tracing=Tracing(provider=provider)) as px:
        yield px


def _client(px: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=px.base_url, api_key="secret-token-xyz", max_retries=0)


def test_request_span_continues_the_clients_trace_and_the_attempt_goes_upstream(
    tproxy: ProxyServer, emulator: Emulator, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    emulator.script({"reset": True, "responses": ["hello there"]})
    _client(tproxy).chat.completions.create(
        model="openai/gpt-4o", messages=MSG, extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    done = spans.get_finished_spans()
    server = [s for s in done if s.kind == SpanKind.SERVER]
    client = [s for s in done if s.kind == SpanKind.CLIENT]
    assert len(server) == 1 and len(client) == 1
    req, att = server[0], client[0]
    assert req.name == "chat openai/gpt-4o"
    assert format(req.context.trace_id, "032x") == TRACE_ID
    assert req.parent is not None and format(req.parent.span_id, "016x") == PARENT_ID
    a = req.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "openai/gpt-4o"
    assert a["gen_ai.response.model"] == "gpt-4o"
    assert a["gen_ai.provider.name"] == "openai"
    event = tproxy.services.usage.events[-1]  # type: ignore[attr-defined]
    assert a["gen_ai.usage.input_tokens"] == event.prompt_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == event.completion_tokens > 0
    assert a["http.response.status_code"] == 200
    assert a["llm_proxy.request_id"] == event.request_id
    assert att.parent is not None and att.parent.span_id == req.context.span_id
    assert att.context.trace_id == req.context.trace_id
    assert att.name == "chat gpt-4o"
    assert att.attributes["server.address"] == "127.0.0.1"
    sent = emulator.requests()[-1]["headers"]["traceparent"]
    assert sent == f"00-{TRACE_ID}-{format(att.context.span_id, '016x')}-01"  # the attempt is the upstream's parent
    for s in done:  # nothing about the caller's credentials
        assert "secret-token-xyz" not in repr(dict(s.attributes or {}))


def test_a_retried_request_has_a_span_per_attempt(
    tproxy: ProxyServer, emulator: Emulator, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    emulator.script({"reset": True, "responses": [{"error": {"status": 503, "message": "busy"}}, "second"]})
    _client(tproxy).chat.completions.create(model="openai/retried", messages=MSG)
    done = spans.get_finished_spans()
    attempts = sorted((s for s in done if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    (req,) = [s for s in done if s.kind == SpanKind.SERVER]
    assert req.parent is None  # no traceparent from the client: a new trace
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR, StatusCode.UNSET]
    assert attempts[0].attributes["http.response.status_code"] == 503
    assert all(s.parent is not None and s.parent.span_id == req.context.span_id for s in attempts)
    assert req.attributes["llm_proxy.attempts"] == 2
    heads = [r["headers"]["traceparent"].rsplit("-", 1)[0] for r in emulator.requests()[-2:]]  # less the flags
    assert heads == [f"00-{format(req.context.trace_id, '032x')}-{format(s.context.span_id, '016x')}"
                     for s in attempts]


def test_stream_and_error_spans(tproxy: ProxyServer, emulator: Emulator, spans: InMemorySpanExporter) -> None:
    spans.clear()
    emulator.script({"reset": True, "responses": ["a streamed answer", {"error": {"status": 500, "message": "x"}}]})
    c = _client(tproxy)
    list(c.chat.completions.create(model="openai/gpt-4o", messages=MSG, stream=True))
    with pytest.raises(openai.InternalServerError):
        c.chat.completions.create(model="openai/gpt-4o", messages=MSG)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MSG)
    c.embeddings.create(model="openai/text-embedding-3-small", input="x")
    reqs = sorted((s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER), key=lambda s: s.start_time or 0)
    assert [s.attributes["http.response.status_code"] for s in reqs] == [200, 500, 404, 200]
    streamed, failed, missing, emb = reqs
    assert streamed.attributes["llm_proxy.streamed"] is True
    assert streamed.attributes["gen_ai.usage.output_tokens"] > 0
    assert failed.status.status_code == StatusCode.ERROR and failed.attributes["error.type"]
    assert missing.status.status_code == StatusCode.UNSET  # a client's 4xx is not the server's error
    assert missing.name == "chat nope"
    assert emb.name == "embeddings openai/text-embedding-3-small"
    assert "gen_ai.usage.output_tokens" not in emb.attributes


def test_tracing_off_imports_nothing() -> None:
    code = (
        "import sys\n"
        "from llm_proxy.app import create_app\n"
        "from llm_proxy.config import load_config_text\n"
        "app = create_app(load_config_text('providers: [{id: openai, type: openai, api_key: x}]\\n"
        "models: [{id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o}]\\n"
        "auth: {mode: none, allow_unauthenticated: true}', env={}, path='x'))\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry') or m == 'llm_proxy.core.tracing']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_enabling_tracing_without_the_exporter_is_a_clear_error() -> None:
    from llm_proxy.app import create_app

    loaded = native_config(basic_config("http://127.0.0.1:9/v1", "tracing: {enabled: true}"))
    with pytest.raises(ValueError, match=r"llm-proxy\[otel\]"):
        create_app(loaded)  # the OTLP exporter is not installed in the test environment
    loaded = native_config(basic_config("http://127.0.0.1:9/v1", "tracing: {enabled: true, exporter: console}"))
    assert create_app(loaded)  # the SDK's console exporter needs nothing else
