"""OpenTelemetry traces (tracing.enabled; the `otel` extra): one span per API request, one child per upstream
attempt, with the GenAI semantic conventions' attributes.

A client's W3C `traceparent` (and `tracestate`) makes the request span its child; every upstream attempt carries
the attempt span's `traceparent`, so an upstream that traces (vLLM, a gateway) joins the same trace. The
attempt span lasts until the answer is in (non-streamed) or its first frame is (a stream); the request span
until the usage event is recorded (a stream: its last frame). Spans carry no user ids, tokens or prompts.

Off (the default) this module is never imported and nothing runs per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import __version__
from .metrics import OPERATIONS

if TYPE_CHECKING:
    from ..config import TracingSettings
    from ..errors import ProxyError
    from ..providers.base import Target
    from ..types import UsageEvent

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The tracer the app uses; `provider` (an SDK TracerProvider) is given by tests, else built from settings."""

    def __init__(self, settings: TracingSettings | None = None, provider: Any = None) -> None:
        self._own = provider is None
        if provider is None:
            provider = _build_provider(settings)
        self.provider = provider
        self._tracer = provider.get_tracer("llm_proxy", __version__)

    def request(self, headers: Mapping[str, str], endpoint: str) -> RequestTrace:
        parent = _PROPAGATOR.extract(headers) if "traceparent" in headers else None
        op = OPERATIONS.get(endpoint, endpoint)
        span = self._tracer.start_span(op, context=parent, kind=SpanKind.SERVER,
                                       attributes={"gen_ai.operation.name": op})
        return RequestTrace(self._tracer, span, op)

    def shutdown(self) -> None:
        if self._own:
            self.provider.shutdown()  # flushes what the batch processor holds


class RequestTrace:
    """One request's span (RequestContext.trace)."""

    __slots__ = ("_op", "_tracer", "span")

    def __init__(self, tracer: Any, span: Any, op: str) -> None:
        self._tracer = tracer
        self.span = span
        self._op = op

    def attempt(self, target: Target, url: str) -> tuple[Any, str | None]:
        """A child span for one upstream attempt, and the `traceparent` to send with it."""
        parts = urlsplit(url)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": self._op,
            "gen_ai.provider.name": target.provider_id,
            "gen_ai.request.model": target.upstream_model,
        }
        if parts.hostname:
            attrs["server.address"] = parts.hostname
            if parts.port:
                attrs["server.port"] = parts.port
        span = self._tracer.start_span(f"{self._op} {target.upstream_model}", context=trace.set_span_in_context(
            self.span), kind=SpanKind.CLIENT, attributes=attrs)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return span, carrier.get("traceparent")

    @staticmethod
    def attempt_failed(span: Any, exc: BaseException) -> None:
        from ..errors import ProxyError

        if isinstance(exc, ProxyError):
            _failed(span, exc)
        else:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def finish(self, event: UsageEvent) -> None:
        span = self.span
        if event.model:
            span.update_name(f"{self._op} {event.model}")
        attrs: dict[str, Any] = {"http.response.status_code": event.status, "llm_proxy.request_id": event.request_id,
                                 "llm_proxy.attempts": event.attempts}
        if event.model:
            attrs["gen_ai.request.model"] = event.model
        if event.upstream_model:
            attrs["gen_ai.response.model"] = event.upstream_model
        if event.provider_id:
            attrs["gen_ai.provider.name"] = event.provider_id
        if event.prompt_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = event.prompt_tokens
        if event.completion_tokens is not None and event.endpoint != "embeddings":
            attrs["gen_ai.usage.output_tokens"] = event.completion_tokens
        if event.streamed:
            attrs["llm_proxy.streamed"] = True
        if event.error_type:
            attrs["error.type"] = event.error_type
        span.set_attributes(attrs)
        if event.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


def _failed(span: Any, exc: ProxyError) -> None:
    span.set_attribute("error.type", exc.code or exc.type)
    span.set_attribute("http.response.status_code", exc.status)
    span.set_status(Status(StatusCode.ERROR))


def _build_provider(settings: TracingSettings | None) -> Any:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ValueError("tracing.enabled needs the OpenTelemetry SDK: pip install 'llm-proxy[otel]'") from None
    name = settings.service_name if settings is not None else "llm-proxy"
    exporter_kind = settings.exporter if settings is not None else "otlp"
    exporter: Any
    if exporter_kind == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError("tracing.exporter otlp needs opentelemetry-exporter-otlp-proto-http: "
                             "pip install 'llm-proxy[otel]'") from None
        exporter = OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_ENDPOINT / _HEADERS, as every OTel SDK reads them
    provider = TracerProvider(resource=Resource.create({"service.name": name, "service.version": __version__}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
