"""Prometheus metrics for GET /metrics: counted per request in plain Python numbers, rendered at scrape time.

Per request (observe(), called where the usage event is recorded) the cost is a dict lookup on the event's raw
labels and a few integer additions and bisections: no prometheus-client objects, no locks, no I/O. Label values
are normalised once per distinct raw tuple (a model nobody configured becomes "unknown", an error type outside
the closed set "other"), so every label set is bounded by the configuration.

Workers (`serve --workers N`): each worker writes its cumulative totals to `w-<pid>.json` in a directory the
parent made (every second, at every scrape and when it stops); the worker that answers a scrape writes its own
file first, then sums every file. A scrape therefore shows every worker's totals whatever worker answers: its
own exactly, the others' as of their last write (at most a second old, or newer if they answered a scrape
since), and never less than an earlier scrape showed (each answer leaves the answering worker's file at least
as new as what it reported), so counters never go back. Files of workers that died stay and keep counting.
Gauges (ledger backlog, journal bytes) are summed over workers: each worker has its own journal.

Names follow the OpenTelemetry GenAI semantic conventions where they define one (gen_ai_client_token_usage,
gen_ai_client_operation_duration_seconds, gen_ai_server_time_to_first_token_seconds, with their attribute names
as labels and their advised buckets); the proxy's own are llm_proxy_*.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from .. import __version__
from ..errors import ERROR_CODES, ERROR_TYPES
from ..types import UsageEvent

log = logging.getLogger("llm_proxy.metrics")

# OpenTelemetry GenAI semantic conventions' advised explicit bucket boundaries.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
# The events carry milliseconds: bisect on these, render seconds.
_DURATION_MS = tuple(b * 1000.0 for b in DURATION_BUCKETS)
_TTFT_MS = tuple(b * 1000.0 for b in TTFT_BUCKETS)

# gen_ai.operation.name for each client API.
OPERATIONS = {"chat.completions": "chat", "completions": "text_completion", "embeddings": "embeddings"}

# The closed sets label values come from (errors.py's, which the usage ledger records); anything else is "other".
# A failed upstream attempt records a code from ERROR_CODES or else a ledger error type.
UPSTREAM_ERRORS = ERROR_CODES | ERROR_TYPES
# A 429 the proxy answered itself (no upstream attempt): the limiter's refusal, by kind.
LIMIT_REASONS = {
    "rate_limit_error": "rate_limit", "rate_limit_exceeded": "rate_limit",
    "insufficient_quota": "budget", "budget_exceeded": "budget",
}
UNKNOWN_MODEL = "unknown"
OTHER = "other"
_CACHE_MAX = 4096  # distinct raw label tuples remembered (client-chosen model names make them unbounded)
SYNC_INTERVAL = 1.0  # seconds between a worker's writes of its totals (multi-worker only)

_REQ_LABELS = ("model", "provider", "api", "status_class", "error_type")
_GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else OTHER


class _Series:
    """Totals for one normalised (model, provider, api, status class, error type)."""

    __slots__ = ("cached", "dur", "dur_sum", "labels", "requests", "tin", "tin_sum", "tout", "tout_sum", "ttft",
                 "ttft_sum")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.requests = 0
        self.dur = [0] * (len(DURATION_BUCKETS) + 1)
        self.dur_sum = 0.0  # ms
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0  # ms
        self.tin = [0] * (len(TOKEN_BUCKETS) + 1)
        self.tin_sum = 0  # prompt tokens (llm_proxy_tokens' "prompt" too)
        self.tout = [0] * (len(TOKEN_BUCKETS) + 1)
        self.tout_sum = 0  # completion tokens (llm_proxy_tokens' "completion" too)
        self.cached = 0


# What a gauge source yields at each snapshot: (family name, label values, value).
GaugeSource = Callable[[], Iterable[tuple[str, tuple[str, ...], float]]]

# A snapshot: family name -> {label tuple -> values}; counters and gauges hold [value], histograms
# [bucket counts (not cumulative)..., overflow count, sum]. JSON in the shared directory.
Snapshot = dict[str, dict[tuple[str, ...], list[float]]]

# (name, type, help, label names, buckets) of every family, in the order they are rendered.
FAMILIES: tuple[tuple[str, str, str, tuple[str, ...], tuple[float, ...] | None], ...] = (
    ("llm_proxy_requests", "counter", "Finished API requests by model, provider, client API, status class and error "
     "type.", _REQ_LABELS, None),
    ("gen_ai_client_operation_duration_seconds", "histogram", "GenAI operation duration (whole request, as the "
     "client saw it).", (*_GENAI_LABELS, "error_type"), DURATION_BUCKETS),
    ("gen_ai_server_time_to_first_token_seconds", "histogram", "Time to the first streamed token.",
     _GENAI_LABELS, TTFT_BUCKETS),
    ("gen_ai_client_token_usage", "histogram", "Tokens per request by type (input, output).",
     (*_GENAI_LABELS, "gen_ai_token_type"), TOKEN_BUCKETS),
    ("llm_proxy_tokens", "counter", "Tokens by type (prompt, completion, cached: the cached part of prompt).",
     ("model", "provider", "api", "type"), None),
    ("llm_proxy_upstream_errors", "counter", "Failed upstream attempts (retried ones included) by error type.",
     ("provider", "error_type"), None),
    ("llm_proxy_limiter_refusals", "counter", "Requests the proxy's limiter refused with 429.",
     ("model", "reason"), None),
    ("llm_proxy_auth_refresh_failures", "counter", "Failed fetches of signing keys (JWKS) or calls to the token "
     "service (Hub, introspection) or the API key store.", ("mode",), None),
    ("llm_proxy_ledger_backlog_rows", "gauge", "Usage rows recorded but not yet in the database.", (), None),
    ("llm_proxy_journal_bytes", "gauge", "Usage journal bytes not yet known to be in the database.", (), None),
    ("llm_proxy_workers", "gauge", "Worker processes whose totals this scrape includes.", (), None),
    ("llm_proxy_build_info", "gauge", "The running version.", ("version",), None),
)


class Metrics:
    """MetricsSink with prometheus-client's text exposition; see the module docstring."""

    def __init__(
        self,
        models: Mapping[str, str] | None = None,
        *,
        shared_dir: str | os.PathLike[str] | None = None,
        sync_interval: float = SYNC_INTERVAL,
        process_metrics: bool | None = None,
        worker: str | None = None,
    ) -> None:
        self._models = dict(models or {})  # public id or alias -> configured id
        self._cache: dict[tuple[Any, ...], _Series] = {}
        self._series: dict[tuple[str, ...], _Series] = {}
        self._upstream_cache: dict[tuple[Any, Any], list[int]] = {}
        self._upstream: dict[tuple[str, str], list[int]] = {}
        self._refusals: dict[tuple[str, str], list[int]] = {}
        self._gauges: list[GaugeSource] = []
        self._dir = Path(shared_dir) if shared_dir is not None else None
        self._file = self._dir / f"w-{worker or os.getpid()}.json" if self._dir is not None else None
        self._interval = sync_interval
        self._task: asyncio.Task[None] | None = None
        # Process metrics (CPU, memory, fds) are one process's: left out when several workers answer.
        self._process_metrics = self._dir is None if process_metrics is None else process_metrics
        self._registry: Any = None

    # ---- hot path ----------------------------------------------------------------------------------

    def observe(self, event: UsageEvent) -> None:
        status = event.status
        key = (event.model, event.provider_id, event.endpoint, status, event.error_type)
        s = self._cache.get(key)
        if s is None:
            s = self._new_series(key)
        s.requests += 1
        ms = event.latency_ms
        if ms is not None:
            s.dur[bisect_left(_DURATION_MS, ms)] += 1
            s.dur_sum += ms
        ms = event.ttft_ms
        if ms is not None:
            s.ttft[bisect_left(_TTFT_MS, ms)] += 1
            s.ttft_sum += ms
        n = event.prompt_tokens
        if n is not None:
            s.tin[bisect_left(TOKEN_BUCKETS, n)] += 1
            s.tin_sum += n
        n = event.completion_tokens
        if n is not None and event.endpoint != "embeddings":
            s.tout[bisect_left(TOKEN_BUCKETS, n)] += 1
            s.tout_sum += n
        n = event.cached_tokens
        if n:
            s.cached += n
        if status >= 400:
            self._failure(event, s)

    def _failure(self, event: UsageEvent, s: _Series) -> None:
        attempts = event.extra.get("attempts")
        if isinstance(attempts, list):
            for a in attempts:
                if not isinstance(a, dict) or a.get("status") == 200:
                    continue
                akey = (a.get("provider"), a.get("error"))
                cell = self._upstream_cache.get(akey)
                if cell is None:
                    cell = self._upstream_cell(akey)
                if cell is not None:
                    cell[0] += 1
        if event.status == 429 and not event.attempts:  # refused before any upstream attempt: the limiter
            reason = LIMIT_REASONS.get(event.error_type or "", OTHER)
            cell = self._refusals.setdefault((s.labels[0], reason), [0])
            cell[0] += 1

    def _new_series(self, key: tuple[Any, ...]) -> _Series:
        model, provider, endpoint, status, error_type = key
        labels = (
            self._models.get(model, UNKNOWN_MODEL) if isinstance(model, str) else UNKNOWN_MODEL,
            provider if isinstance(provider, str) else "",  # only configured providers are ever set
            endpoint if endpoint in OPERATIONS else OTHER,
            status_class(status) if isinstance(status, int) else OTHER,
            "" if error_type is None else error_type if error_type in ERROR_TYPES else OTHER,
        )
        s = self._series.get(labels)
        if s is None:
            s = self._series[labels] = _Series(labels)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = s
        return s

    def _upstream_cell(self, akey: tuple[Any, Any]) -> list[int] | None:
        provider, error = akey
        if provider is None or error == "client_disconnected":  # the client left: not the upstream's failure
            return None
        labels = (str(provider), error if error in UPSTREAM_ERRORS else OTHER)
        cell = self._upstream.setdefault(labels, [0])
        if len(self._upstream_cache) >= _CACHE_MAX:
            self._upstream_cache.clear()
        self._upstream_cache[akey] = cell
        return cell

    # ---- scrape side ---------------------------------------------------------------------------------

    def add_gauges(self, source: GaugeSource) -> None:
        """`source()` yields (family name, label values, value) at every snapshot (gauges and pulled counters)."""
        self._gauges.append(source)

    def snapshot(self) -> Snapshot:
        """This process's totals."""
        snap: Snapshot = {name: {} for name, *_ in FAMILIES}
        req, dur, ttft, tokens, tok = (snap[n] for n in (
            "llm_proxy_requests", "gen_ai_client_operation_duration_seconds",
            "gen_ai_server_time_to_first_token_seconds", "gen_ai_client_token_usage", "llm_proxy_tokens"))
        for s in list(self._series.values()):
            model, provider, api, _, error_type = s.labels
            req[s.labels] = [s.requests]
            op = OPERATIONS.get(api, OTHER)
            _add(dur, (op, provider, model, error_type), [*s.dur, s.dur_sum / 1000.0])
            if s.ttft_sum or any(s.ttft):
                _add(ttft, (op, provider, model), [*s.ttft, s.ttft_sum / 1000.0])
            if any(s.tin):
                _add(tokens, (op, provider, model, "input"), [*s.tin, s.tin_sum])
            if any(s.tout):
                _add(tokens, (op, provider, model, "output"), [*s.tout, s.tout_sum])
            for kind, n in (("prompt", s.tin_sum), ("completion", s.tout_sum), ("cached", s.cached)):
                if n:
                    _add(tok, (model, provider, api, kind), [n])
        for pair, cell in list(self._upstream.items()):
            snap["llm_proxy_upstream_errors"][pair] = [cell[0]]
        for pair, cell in list(self._refusals.items()):
            snap["llm_proxy_limiter_refusals"][pair] = [cell[0]]
        for source in self._gauges:
            try:
                for name, labels, value in source():
                    _add(snap[name], labels, [value])
            except Exception:  # a gauge must never break a scrape
                log.exception("metrics source failed")
        snap["llm_proxy_workers"][()] = [1]
        snap["llm_proxy_build_info"][(__version__,)] = [1]
        return snap

    def merged(self) -> Snapshot:
        """Every worker's totals: this one's now, the others' as of their last write (see the module docstring)."""
        snap = self.snapshot()
        if self._dir is None:
            return snap
        self._write(snap)
        out: Snapshot = {name: {} for name, *_ in FAMILIES}
        for other in self._read_all():
            for name, series in other.items():
                fam = out.get(name)
                if fam is None:
                    continue
                for labels, values in series.items():
                    _add(fam, labels, values)
        out["llm_proxy_build_info"] = snap["llm_proxy_build_info"]  # one version, not a count of workers
        return out

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

        if self._registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self))
            if self._process_metrics:
                ProcessCollector(registry=registry)
            self._registry = registry
        return bytes(generate_latest(self._registry))

    # ---- the shared directory -----------------------------------------------------------------------

    def _write(self, snap: Snapshot) -> None:
        assert self._file is not None
        doc = {name: [[list(k), v] for k, v in series.items()] for name, series in snap.items()}
        tmp = self._file.with_suffix(".tmp")
        try:
            tmp.write_bytes(orjson.dumps(doc))
            os.replace(tmp, self._file)
        except OSError as exc:
            log.warning("cannot write this worker's metrics: %s", exc, extra={"path": str(self._file)})

    def _read_all(self) -> Iterator[Snapshot]:
        assert self._dir is not None
        try:
            paths = sorted(self._dir.glob("w-*.json"))
        except OSError:
            paths = []
        for p in paths:
            try:
                doc = orjson.loads(p.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue  # a worker's file being replaced is read on the next scrape
            yield {name: {tuple(k): v for k, v in series} for name, series in doc.items()}

    async def start(self) -> None:
        if self._dir is not None and self._task is None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._write(self.snapshot())
            self._task = asyncio.create_task(self._sync())

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self._write(self.snapshot())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._write(self.snapshot())  # this worker's final totals keep counting after it stops


def _add(fam: dict[tuple[str, ...], list[float]], labels: tuple[str, ...], values: list[float]) -> None:
    cur = fam.get(labels)
    if cur is None:
        fam[labels] = list(values)
    else:
        for i, v in enumerate(values):
            cur[i] += v


class _Collector:
    """prometheus-client's view of Metrics.merged()."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self._metrics.merged()
        for name, kind, doc, labels, buckets in FAMILIES:
            series = snap.get(name, {})
            fam: Any
            if kind == "counter":
                fam = CounterMetricFamily(name, doc, labels=labels)
            elif kind == "gauge":
                fam = GaugeMetricFamily(name, doc, labels=labels)
            else:
                fam = HistogramMetricFamily(name, doc, labels=labels)
            for values_labels, values in sorted(series.items()):
                if buckets is None:
                    fam.add_metric(list(values_labels), values[0])
                    continue
                cumulative, total = [], 0.0
                for bound, n in zip((*buckets, float("inf")), values[:-1], strict=True):
                    total += n
                    cumulative.append((_le(bound), total))
                fam.add_metric(list(values_labels), cumulative, sum_value=values[-1])
            yield fam


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


class NullMetrics:
    """server.metrics.enabled: false — counts nothing."""

    def observe(self, event: UsageEvent) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def render(self) -> bytes:
        return b""


def model_labels(models: Iterable[Any]) -> dict[str, str]:
    """Public id and every alias -> the configured id (ModelSettings-like objects with `id` and `aliases`)."""
    out: dict[str, str] = {}
    for m in models:
        out[m.id] = m.id
        for a in m.aliases:
            out.setdefault(a, m.id)
    return out


def usage_gauges(health: Callable[[], Mapping[str, Any]]) -> GaugeSource:
    """Backlog and journal bytes from the usage sink's health()."""

    def source() -> Iterator[tuple[str, tuple[str, ...], float]]:
        h = health()
        yield "llm_proxy_ledger_backlog_rows", (), float(h.get("backlog") or 0)
        yield "llm_proxy_journal_bytes", (), float(h.get("spool_bytes") or 0)

    return source


def auth_failures(health: Callable[[], Mapping[str, Any]]) -> GaugeSource:
    """Refresh failures by auth mode from the authenticator's health() (`refresh_failures`; a chain's `modes`)."""

    def source() -> Iterator[tuple[str, tuple[str, ...], float]]:
        h = health()
        parts = h.get("modes")
        items = parts.items() if isinstance(parts, dict) else [(h.get("mode"), h)]
        for mode, part in items:
            n = part.get("refresh_failures") if isinstance(part, dict) else None
            if isinstance(mode, str) and isinstance(n, int):
                yield "llm_proxy_auth_refresh_failures", (mode,), float(n)

    return source
