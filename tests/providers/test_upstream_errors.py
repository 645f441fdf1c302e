"""The one path upstream errors take: credentials scrubbed, only plain tokens relayed, 5xx internals withheld,
error types stored from a closed set; the OpenAI stream decoder rebuilds error events instead of relaying them."""

from __future__ import annotations

import orjson
import pytest

from llm_proxy.errors import ERROR_CODES, ERROR_TYPES, ProxyError, RateLimited, ledger_error_code, ledger_error_type
from llm_proxy.providers.credentials import header_secrets, scrub
from llm_proxy.providers.openai_compat import OpenAIStreamDecoder, error_from_openai_body
from llm_proxy.providers.upstream_errors import looks_internal, retry_headers, safe_token, upstream_error

KEY = "sk-Test/Key+0123456789=abcdef"


def test_scrub_every_spelling_of_a_key() -> None:
    text = (f"key {KEY} upper {KEY.upper()} mixed {KEY.swapcase()} url key%3D{'sk-Test%2FKey%2B0123456789%3Dabcdef'}"
            f" lower-url sk-test%2fkey%2b0123456789%3dabcdef plus sk-Test%2FKey%2B0123456789%3Dabcdef"
            f" inside xx{KEY}yy")
    out = scrub(text, [KEY, None, ""])
    assert "0123456789" not in out and out.count("[redacted]") == 7


def test_a_long_key_cut_short_is_scrubbed_too() -> None:
    key = "sk-proj-AbCdEfGh0123456789-ZyXwVuTsRqPo"
    out = scrub(f"bad key {key[:20]}... and {key[:-5].lower()}\nand OpenAI's own mask sk-proj-****Po", [key])
    assert out == "bad key [redacted] and [redacted]\nand OpenAI's own mask sk-proj-****Po"


def test_non_ascii_text_is_not_let_through_by_the_pre_check() -> None:
    # The regex folds U+0130 to "i"; casefold() would not find the key, so such text skips the pre-check.
    assert scrub("grüße sk-İabcdefgh", ["sk-iabcdefgh"]) == "grüße [redacted]"


def test_short_placeholders_are_not_secrets() -> None:
    assert scrub("abc and ab", ["abc", "ab", None]) == "abc and ab"


def test_credential_headers_count_as_secrets() -> None:
    assert header_secrets({"X-Gateway-Token": "t1", "Authorization": "Bearer t2", "X-Team": "blue",
                           "api-key": "t3", "OpenAI-Organization": "org"}) == ["t1", "Bearer t2", "t3"]


@pytest.mark.parametrize("value", ["invalid_request_error", "BadRequestError", "context_length_exceeded", 429,
                                   "DeploymentNotFound", "content_filter", "v1.2-beta"])
def test_plain_tokens_are_relayed(value: object) -> None:
    assert safe_token(value, [KEY]) == str(value)


@pytest.mark.parametrize("value", [KEY, "sk-Test", "invalid key sk", "a" * 65, "x" * 33, True, None, 4.5, {"a": 1},
                                   "err\nor", "sk-proj-" + "Ab1" * 14, "type_SK-TEST/KEY+0123456789=ABCDEF"])
def test_anything_else_is_not(value: object) -> None:
    assert safe_token(value, [KEY, "sk-Test"]) is None


@pytest.mark.parametrize("message", [
    'Traceback (most recent call last):\n  File "/app/server.py", line 3, in <module>\nKeyError: x',
    "java.lang.NullPointerException\n\tat com.example.Inference.run(Inference.java:42)",
    "panic: runtime error: index out of range\n\ngoroutine 1 [running]:\nmain.main()",
    "Error: boom\n    at handler (/srv/api/node_modules/express/lib/router.js:12:3)",
    "failed in /usr/lib/python3.11/site-packages/vllm/engine.py",
    "error at C:\\Users\\svc\\model\\run.cs",
    "model.py:213 CUDA out of memory",
    "one\ntwo\nthree\nfour\nfive",
])
def test_internals_are_recognised(message: str) -> None:
    assert looks_internal(message)


@pytest.mark.parametrize("message", [
    "The server had an error while processing your request. Sorry about that!",
    "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, Used 29990.",
    "The model `gpt-5` does not exist or you do not have access to it. See https://platform.openai.com/docs/models",
    "Overloaded", "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 and 200",
    "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/"
    "troubleshooting",
    "The server had an error processing your request. You can retry your request, or contact us through an Azure "
    "support request at: https://go.microsoft.com/fwlink/?linkid=2213926 (Please include the request ID abc-123.)",
])
def test_ordinary_messages_are_not_internals(message: str) -> None:
    assert not looks_internal(message)


def test_a_5xx_with_internals_gets_our_message_and_the_log_gets_the_scrubbed_original() -> None:
    msg = f'Traceback (most recent call last):\n  File "/srv/app.py", line 1\nValueError: bad key {KEY}'
    err = upstream_error(500, {}, msg, "server_error", None, None, "vllm-a", [KEY])
    assert err.status == 500 and err.message == "Upstream provider 'vllm-a' failed with an internal error (HTTP 500)"
    assert err.detail is not None and "/srv/app.py" in err.detail and KEY not in err.detail
    # A 4xx keeps its (scrubbed) message: it tells the client what to fix.
    err = upstream_error(400, {}, f"bad param /srv/app.py:1 {KEY}", None, None, None, "vllm-a", [KEY])
    assert err.message == "bad param /srv/app.py:1 [redacted]" and err.detail is None


def test_an_unreadable_5xx_body_is_logged_scrubbed_and_cut() -> None:
    raw = f"<html><pre>Traceback (most recent call last): key={KEY}</pre>".encode() + b"x" * 5000 + KEY.encode()
    err = error_from_openai_body(502, {}, raw, "p", [KEY])
    assert err.message == "Upstream provider 'p' returned HTTP 502"
    assert err.detail is not None and len(err.detail) == 1000 and "key=[redacted]</pre>" in err.detail
    assert error_from_openai_body(400, {}, raw, "p", [KEY]).detail is None  # only a 5xx's body is logged


def test_fields_headers_and_status() -> None:
    raw = orjson.dumps({"error": {"message": f"no {KEY}", "type": KEY, "code": f"{KEY}_x", "param": f"{KEY}"}})
    headers = {"retry-after": KEY, "retry-after-ms": "1500", "x-other": KEY}
    err = error_from_openai_body(429, headers, raw, "p", [KEY])
    assert isinstance(err, RateLimited)
    assert (err.message, err.type, err.code, err.param) == ("no [redacted]", "rate_limit_error", "rate_limit_exceeded",
                                                            None)
    assert err.headers == {"retry-after-ms": "1500"}
    assert retry_headers({"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}) == {
        "retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}
    ok = error_from_openai_body(400, {}, orjson.dumps({"error": {"message": "m", "type": "BadRequestError",
                                                                 "code": 400, "param": "messages[0].content"}}),
                                "p", [KEY])
    assert (ok.type, ok.code, ok.param) == ("BadRequestError", "400", "messages[0].content")
    auth = error_from_openai_body(401, {}, orjson.dumps({"error": {"message": f"bad key {KEY}"}}), "p", [KEY])
    assert (auth.status, auth.code, auth.detail) == (502, "upstream_auth_failed", "bad key [redacted]")


def test_ledger_types_and_codes_are_a_closed_set() -> None:
    assert ledger_error_type(ProxyError("x", status=429, type="tokens")) == "rate_limit_error"
    assert ledger_error_type(ProxyError("x", status=400, type=KEY)) == "invalid_request_error"
    assert ledger_error_type(ProxyError("x", status=503, type="BadRequestError")) == "api_error"
    assert ledger_error_type(ProxyError("x", status=400, type="invalid_request_error")) == "invalid_request_error"
    assert ledger_error_code(ProxyError("x", status=400, type=KEY, code=KEY)) == "invalid_request_error"
    assert ledger_error_code(ProxyError("x", status=502, code="upstream_auth_failed")) == "upstream_auth_failed"
    assert "client_disconnected" in ERROR_TYPES and "upstream_timeout" in ERROR_CODES


def _chunk(text: str) -> bytes:
    return b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"up","choices":[{"index":0,' \
           b'"delta":{"content":"' + text.encode() + b'"},"finish_reason":null}]}\n\n'


def test_stream_error_event_is_rebuilt_even_when_it_looks_like_a_chunk() -> None:
    # The error event carries the same `"model":"up"` bytes as the chunks, so only the error check keeps it off
    # the fast path (which relays a read with one bytes.replace).
    error = b'data: {"error":{"message":"key ' + KEY.upper().encode() + b'","type":"' + KEY.encode() + \
        b'","code":"x"},"model":"up"}\n\n'
    dec = OpenAIStreamDecoder("public", False, [KEY], "up-a")
    frames = dec.feed(_chunk("Hi") + error)
    out = b"".join(frames)
    assert KEY.lower() not in out.decode().lower()
    last = orjson.loads(frames[-1][6:])
    assert last == {"error": {"message": "key [redacted]", "type": "api_error", "param": None, "code": "x"}}
    assert dec.error is not None and dec.error.status == 502
    assert b'"model":"public"' in frames[0]


def test_stream_error_event_status_from_vllm_code_and_unreadable_events() -> None:
    dec = OpenAIStreamDecoder("public", False, [KEY], "up-a")
    frames = dec.feed(b'data: {"error":{"object":"error","message":"m","type":"BadRequestError","code":400}}\n\n')
    assert dec.error is not None and dec.error.status == 400 and len(frames) == 1
    dec = OpenAIStreamDecoder("public", False, [KEY], "up-a")
    frames = dec.feed(b'data: {"error": "cut ' + KEY.encode() + b'\n\n')
    assert orjson.loads(frames[0][6:])["error"]["message"] == "Upstream provider 'up-a' returned HTTP 502"


def test_successful_chunks_keep_the_fast_path() -> None:
    dec = OpenAIStreamDecoder("public", False, [KEY])
    data = _chunk("a") + _chunk("b")
    assert dec.feed(data) == [data.replace(b'"model":"up"', b'"model":"public"')]
    assert dec.error is None
