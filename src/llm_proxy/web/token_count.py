"""`POST /v1/messages/count_tokens`: Anthropic's token count of a Messages request, answered here.

No upstream is asked (and no usage row is written: nothing is billed). The request is translated like a Messages
request (ingress/anthropic_messages.py), authenticated through the same credentials, checked against the model
policy, and its prompt counted with the estimator the ledger uses when an upstream reports no usage
(core/usage_estimate.py: tiktoken for OpenAI-family models, one token per four characters otherwise), so for
other models the count is an estimate."""

from __future__ import annotations

from aiohttp import web

from ..core import usage_estimate
from ..ingress import anthropic_messages
from ..ingress.base import Call
from ..ingress.translated import MESSAGES
from .errors import as_proxy_error
from .exchange import expect_handler, read_json
from .guard import authenticate
from .state import CTX, SERVICES

_JSON = "application/json"


async def count_tokens(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = request[CTX]
    try:
        await authenticate(request, anthropic_messages.credentials(request.headers))
        body = await read_json(request, svc)
        neutral = anthropic_messages.count_request(body)
        call = Call(neutral["model"], "chat.completions", neutral, False, False)
        route = svc.gateway.resolve(ctx, call)  # the model exists and the caller may use it
        texts, framing = usage_estimate.prompt_texts("chat.completions", neutral)
        usage = await usage_estimate.estimate(route.canonical, texts, framing, ())
        return web.Response(body=anthropic_messages.count_json(usage.prompt_tokens), content_type=_JSON)
    except Exception as exc:
        err = as_proxy_error(exc, ctx.request_id, request.path)
        return web.Response(status=err.status, body=anthropic_messages.error_body(err), content_type=_JSON,
                            headers={**err.headers, "x-request-id": ctx.request_id})


def add_token_count_routes(app: web.Application) -> None:
    expect = expect_handler(MESSAGES)  # "100 Continue" only after authentication, as on the Messages routes
    for path in anthropic_messages.COUNT_PATHS:
        app.router.add_post(path, count_tokens, expect_handler=expect)
