"""Read side of the ledger: GET /v1/usage reports and stored chat completions (own rows; admins see all), stored
Responses (GET /v1/responses/{id}: their maker only)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from ..core.usage import UsageLedger
from ..core.usage_report import parse_group_by, parse_time, report_document
from ..errors import BadRequest, Forbidden, NotFound, ServiceUnavailable
from ..ingress.openai import PREFIXES
from ..types import Principal
from .guard import protected
from .state import CTX, SERVICES, Services

log = logging.getLogger("llm_proxy.web")

DEFAULT_WINDOW = timedelta(days=30)
DEFAULT_GROUP_BY = "user,model"
# Reads wait this long for events still in the ledger's queue, so a caller sees its own recent requests.
FLUSH_WAIT_SECONDS = 1.0


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _caller(request: web.Request) -> tuple[Services, Principal, UsageLedger]:
    """The services, the caller (authenticated: every route here is `protected`) and the ledger."""
    svc = request.app[SERVICES]
    principal = request[CTX].principal
    assert principal is not None
    ledger = svc.usage
    if not isinstance(ledger, UsageLedger):
        raise NotFound("The usage ledger is disabled on this server (usage.enabled: false)", code="usage_disabled")
    return svc, principal, ledger


def _unavailable(exc: Exception) -> ServiceUnavailable:
    log.warning("usage database read failed", extra={"error": f"{type(exc).__name__}: {exc}"[:500]})
    return ServiceUnavailable("The usage database is unavailable; try again later", code="usage_database_unavailable")


async def usage_report(request: web.Request) -> web.StreamResponse:
    svc, principal, ledger = _caller(request)
    return _json(await report_for(ledger, principal, svc.policy.is_admin(principal), request.query))


async def report_for(ledger: UsageLedger, principal: Principal, admin: bool, q: Mapping[str, str], *,
                     percentiles: bool = False) -> dict[str, Any]:
    """The usage report `principal` may see (all of it for an admin) for the query's from / to / group_by / user;
    with `percentiles`, also `latency_ms` {p50, p95, p99} over the same rows."""
    try:
        now = datetime.now(UTC)
        since = parse_time(q["from"], now=now) if q.get("from") else now - DEFAULT_WINDOW
        until = parse_time(q["to"], now=now) if q.get("to") else None
        group_by = parse_group_by(q.get("group_by", DEFAULT_GROUP_BY))
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid_parameter") from None
    subject: str | None = None if admin else principal.subject
    wanted = q.get("user")
    if wanted:
        if not admin and wanted != principal.subject:
            raise Forbidden("Only administrators may read other users' usage", param="user", code="not_admin")
        subject = wanted
    await ledger.flush(FLUSH_WAIT_SECONDS)
    try:
        rows, totals = await ledger.db.usage_report(since=since, until=until, group_by=group_by, subject=subject)
        latency = await ledger.db.latency_percentiles(since=since, until=until, subject=subject) if percentiles \
            else None
    except Exception as exc:
        raise _unavailable(exc) from None
    doc = report_document(
        rows, totals, group_by=group_by, since=since, until=until, scope="all" if subject is None else "user"
    )
    if subject is not None:
        doc["user"] = subject
    if latency is not None:
        doc["latency_ms"] = latency
    return doc


def _completion_object(row: dict[str, Any]) -> dict[str, Any]:
    response = row.get("response")
    out: dict[str, Any] = dict(response) if isinstance(response, dict) else {}
    out.setdefault("id", row["completion_id"])
    out["input_messages"] = row.get("input_messages") or []
    return out


async def list_chat_completions(request: web.Request) -> web.StreamResponse:
    svc, principal, ledger = _caller(request)
    q = request.query
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        raise BadRequest("'limit' must be an integer", param="limit") from None
    if not 1 <= limit <= 100:
        raise BadRequest("'limit' must be between 1 and 100", param="limit")
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("'order' must be 'asc' or 'desc'", param="order")
    subject = None if svc.policy.is_admin(principal) else principal.subject
    await ledger.flush(FLUSH_WAIT_SECONDS)
    try:
        rows, has_more = await ledger.db.list_completions(
            subject=subject, limit=limit, after=q.get("after") or None, order=order, model=q.get("model") or None
        )
    except Exception as exc:
        raise _unavailable(exc) from None
    data = [_completion_object(r) for r in rows]
    return _json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


async def get_chat_completion(request: web.Request) -> web.StreamResponse:
    svc, principal, ledger = _caller(request)
    completion_id = request.match_info["completion_id"]
    subject = None if svc.policy.is_admin(principal) else principal.subject
    try:
        row = await ledger.db.get_completion(completion_id, subject=subject)
        if row is None and await ledger.flush(FLUSH_WAIT_SECONDS):
            row = await ledger.db.get_completion(completion_id, subject=subject)
    except Exception as exc:
        raise _unavailable(exc) from None
    if row is None:
        raise NotFound(f"No stored chat completion with id '{completion_id}'", param="completion_id")
    return _json(_completion_object(row))


async def get_response(request: web.Request) -> web.StreamResponse:
    """GET /v1/responses/{response_id}: a stored Response (`store: true`), only to the caller who made it."""
    svc, principal, ledger = _caller(request)
    response_id = request.match_info["response_id"]
    if not svc.store_completions:
        raise NotFound("This server keeps no responses (usage.store_completions is off)", param="response_id")
    row = await ledger.stored_response(response_id, principal.subject)
    if row is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return _json(row["response"])


def add_usage_routes(app: web.Application) -> None:
    app.router.add_get("/v1/usage", protected(usage_report))
    for prefix in PREFIXES:
        app.router.add_get(prefix + "/chat/completions", protected(list_chat_completions))
        app.router.add_get(prefix + "/chat/completions/{completion_id}", protected(get_chat_completion))
        app.router.add_get(prefix + "/responses/{response_id}", protected(get_response))
