"""Bedrock Converse translator against a loopback fake that verifies SigV4 and streams real event-stream frames."""

from __future__ import annotations

import hmac
import re
import struct
import time
import uuid
import zlib
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer

from llm_proxy.config import ProviderSettings
from llm_proxy.errors import BadRequest, RateLimited, UpstreamError
from llm_proxy.providers import bedrock as br
from llm_proxy.providers.base import Target, UpstreamRequest
from llm_proxy.providers.eventstream import EventStreamDecoder, EventStreamError
from llm_proxy.providers.registry import build_provider
from llm_proxy.providers.signing import SigV4Signer

from .schemas import check_bedrock_event, check_bedrock_response, validate_bedrock_request
from .support import (
    FakeUpstream,
    Received,
    accumulate,
    call,
    fake_upstream_fixture,
    fixture_bytes,
    fixture_json,
    json_response,
    parse_frames,
    split_every,
    stream_response,
    strip_volatile,
)

P = "bedrock"
REGION = "eu-west-3"
ACCESS_KEY = "AKIDEXAMPLE0TEST0KEY"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE-session-token//8="
SECRETS = {ACCESS_KEY: SECRET_KEY}
CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
PROFILE_ARN = "arn:aws:bedrock:eu-west-3:123456789012:inference-profile/eu.anthropic.claude-3-7-sonnet-20250219-v1:0"

# ---------------------------------------------------------------------------------------------- event-stream encoding


def _header(name: str, value: Any) -> bytes:
    out = bytes([len(name)]) + name.encode()
    if value is True:
        return out + b"\x00"
    if value is False:
        return out + b"\x01"
    if isinstance(value, int):
        return out + b"\x05" + struct.pack(">q", value)
    if isinstance(value, bytes):
        return out + b"\x06" + struct.pack(">H", len(value)) + value
    if isinstance(value, uuid.UUID):
        return out + b"\x09" + value.bytes
    raw = str(value).encode()
    return out + b"\x07" + struct.pack(">H", len(raw)) + raw


def encode_message(headers: dict[str, Any], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (lengths + CRC), headers, payload, message CRC."""
    hb = b"".join(_header(k, v) for k, v in headers.items())
    prelude = struct.pack(">II", 12 + len(hb) + len(payload) + 4, len(hb))
    msg = prelude + struct.pack(">I", zlib.crc32(prelude)) + hb + payload
    return msg + struct.pack(">I", zlib.crc32(msg))


def encode_events(events: list[dict[str, Any]]) -> bytes:
    out = b""
    for ev in events:
        payload = orjson.dumps(ev["payload"])
        if "exception" in ev:
            headers = {":exception-type": ev["exception"], ":content-type": "application/json",
                       ":message-type": "exception"}
        else:
            headers = {":event-type": ev["event"], ":content-type": "application/json", ":message-type": "event"}
        out += encode_message(headers, payload)
    return out


# ---------------------------------------------------------------------------------------------- SigV4 verification

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<ak>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<sig>[0-9a-f]{64})$"
)


def verify_sigv4(rec: Received) -> str | None:
    """Recompute the signature with botocore from the request as received; None when valid, else why not."""
    m = _AUTH.match(rec.headers.get("authorization", ""))
    if m is None:
        return "no SigV4 authorization header"
    secret = SECRETS.get(m["ak"])
    if secret is None:
        return "unknown access key"
    amz_date = rec.headers.get("x-amz-date", "")
    if amz_date[:8] != m["date"] or m["region"] != REGION or m["service"] != "bedrock":
        return "credential scope mismatch"
    skew = abs((datetime.now(UTC) - datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)).total_seconds())
    if skew > 300:
        return "request time too skewed"
    signed = m["signed"].split(";")
    for required in ("host", "x-amz-date", "content-type"):
        if required not in signed:
            return f"{required} not signed"
    if "x-amz-security-token" in rec.headers and "x-amz-security-token" not in signed:
        return "session token not signed"
    headers = {h: rec.headers[h] for h in signed}
    query = "&".join(f"{k}={v}" for k, v in sorted(rec.query.items()))
    url = f"http://{rec.headers['host']}{rec.path}" + (f"?{query}" if query else "")
    aws = AWSRequest(method=rec.method, url=url, data=rec.body, headers=headers)
    aws.context["timestamp"] = amz_date
    auth = SigV4Auth(Credentials(m["ak"], secret, rec.headers.get("x-amz-security-token")), "bedrock", REGION)
    expected = auth.signature(auth.string_to_sign(aws, auth.canonical_request(aws)), aws)
    return None if hmac.compare_digest(expected, m["sig"]) else "signature mismatch"


def _aws_error(name: str) -> web.Response:
    fx = fixture_json(P, name)
    status = {"ThrottlingException": 429, "InternalServerException": 500, "ValidationException": 400,
              "AccessDeniedException": 403}[fx["type"].split(":")[0]]
    return json_response(fx["body"], status, {"x-amzn-ErrorType": fx["type"], "x-amzn-RequestId": str(uuid.uuid4())})


async def _handler(request: web.Request, rec: Received) -> web.StreamResponse:
    why = verify_sigv4(rec)
    if why is not None:
        return json_response({"message": f"The request signature we calculated does not match ({why})"}, 403,
                             {"x-amzn-ErrorType": "InvalidSignatureException:http://internal.amazon.com/coral/"})
    m = re.match(r"^/model/([^/]+)/(converse|converse-stream)$", rec.path)
    if m is None:
        return json_response({"message": "unknown operation"}, 404, {"x-amzn-ErrorType": "UnknownOperationException"})
    model_id, op = unquote(m[1]), m[2]
    body = rec.json()
    try:
        validate_bedrock_request(model_id, body, "ConverseStream" if op == "converse-stream" else "Converse")
    except AssertionError as exc:
        return json_response({"message": str(exc)}, 400, {"x-amzn-ErrorType": "ValidationException"})
    if model_id.endswith("-429"):
        return _aws_error("error_429.json")
    if model_id.endswith("-500"):
        return _aws_error("error_500.json")
    kind = "tools" if "toolConfig" in body else "text"
    if model_id.endswith("-exception"):
        kind = "exception"
    if op == "converse-stream":
        data = encode_events(fixture_json(P, f"stream_{kind}.json"))
        return await stream_response(request, data, "application/vnd.amazon.eventstream", piece=29,
                                     headers={"x-amzn-RequestId": str(uuid.uuid4())})
    return json_response(fixture_bytes(P, f"response_{kind}.json"))


fake = fake_upstream_fixture(_handler)


def _provider(fake: FakeUpstream, **kw: Any) -> Any:
    settings: dict[str, Any] = {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY,
                                "aws_session_token": SESSION_TOKEN, **kw}
    return build_provider(ProviderSettings(id="aws", type="bedrock", base_url=fake.url, region=REGION, **settings))


def _target(model: str) -> Target:
    return Target("aws", model, "aws/claude")


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": "Hi"}], **kw}


# -------------------------------------------------------------------------------------------------- golden / units


@pytest.mark.parametrize("name", ["chat_request.json", "tools_request.json"])
def test_request_golden_and_schema(name: str) -> None:
    fx = fixture_json(P, name)
    out = br.translate_request(fx["openai"])
    assert out == fx["upstream"]
    validate_bedrock_request(CLAUDE, out)
    validate_bedrock_request(CLAUDE, out, "ConverseStream")


def test_fixtures_match_service_model() -> None:
    check_bedrock_response(fixture_json(P, "response_text.json"))
    check_bedrock_response(fixture_json(P, "response_tools.json"))
    for name in ("stream_text.json", "stream_tools.json"):
        for ev in fixture_json(P, name):
            check_bedrock_event(ev["event"], ev["payload"])


def test_tool_choice_none_and_auto() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert "toolConfig" not in br.translate_request(_chat(tools=tools, tool_choice="none"))
    auto = br.translate_request(_chat(tools=tools, tool_choice="auto"))
    assert auto["toolConfig"] == {"tools": [{"toolSpec": {"name": "f", "inputSchema": {
        "json": {"type": "object", "properties": {}}}}}]}
    specific = br.translate_request(_chat(tools=tools, tool_choice={"type": "function", "function": {"name": "f"}}))
    assert specific["toolConfig"]["toolChoice"] == {"tool": {"name": "f"}}


def test_remote_image_urls_are_refused() -> None:
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}
    with pytest.raises(BadRequest):
        br.translate_request({"messages": [msg]})


def test_url_encodes_model_ids_stably() -> None:
    p = build_provider(ProviderSettings(id="aws", type="bedrock", region=REGION, aws_access_key_id=ACCESS_KEY,
                                        aws_secret_access_key=SECRET_KEY))
    req = p.build_request("chat.completions", _chat(), _target(PROFILE_ARN), True)
    assert req.url.startswith(f"https://bedrock-runtime.{REGION}.amazonaws.com/model/arn:aws:bedrock:")
    assert "inference-profile%2Feu.anthropic" in req.url and req.url.endswith("/converse-stream")
    assert req.framing == "aws-eventstream"


def test_signer_uses_env_fallback_and_reports_missing() -> None:
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    assert br.BedrockProvider(ProviderSettings(id="a", type="bedrock"), env=env).missing_credentials() == []
    assert br.BedrockProvider(ProviderSettings(id="a", type="bedrock"), env={}).missing_credentials() == [
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    bearer = br.BedrockProvider(ProviderSettings(id="a", type="bedrock"), env={"AWS_BEARER_TOKEN_BEDROCK": "abk-1"})
    assert bearer.missing_credentials() == []


async def test_bearer_api_key() -> None:
    p = br.BedrockProvider(ProviderSettings(id="a", type="bedrock", api_key="bedrock-api-key-123"), env={})
    req = p.build_request("chat.completions", _chat(), _target(CLAUDE), False)
    await p.sign(req)
    assert req.headers["authorization"] == "Bearer bedrock-api-key-123" and "x-amz-date" not in req.headers


def test_sigv4_matches_botocore_add_auth() -> None:
    """Our spelled-out signing equals botocore's own add_auth for the same instant."""
    fixed = datetime(2025, 3, 1, 12, 30, 0, tzinfo=UTC)
    signer = SigV4Signer(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, REGION, "bedrock", clock=lambda: fixed)
    url = f"https://bedrock-runtime.{REGION}.amazonaws.com/model/{CLAUDE.replace(':', '%3A')}/converse"
    req = UpstreamRequest("POST", url, {"content-type": "application/json"}, b'{"messages":[]}')
    signer.apply(req)
    ref = AWSRequest(method="POST", url=url, data=b'{"messages":[]}', headers={"content-type": "application/json"})
    from unittest import mock

    with mock.patch("botocore.auth.get_current_datetime", return_value=fixed.replace(tzinfo=None)):
        SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN), "bedrock", REGION).add_auth(ref)
    assert req.headers["authorization"] == ref.headers["Authorization"]
    assert req.headers["x-amz-date"] == ref.headers["X-Amz-Date"] == "20250301T123000Z"
    assert req.headers["x-amz-security-token"] == SESSION_TOKEN


# -------------------------------------------------------------------------------------------------- event stream


def test_encoder_agrees_with_botocore_decoder() -> None:
    raw = encode_events(fixture_json(P, "stream_tools.json"))
    buf = EventStreamBuffer()
    buf.add_data(raw)
    theirs = [(m.headers, m.payload) for m in buf]
    ours = [(m.headers, m.payload) for m in EventStreamDecoder().feed(raw)]
    assert ours == theirs and len(ours) == 12


def test_decoder_header_types_and_splits() -> None:
    u = uuid.uuid4()
    msg = encode_message({"b1": True, "b0": False, "n": -5, "raw": b"\x00\x01", "id": u, "s": "é"}, b"{}")
    for size in (1, 2, 7, len(msg)):
        dec = EventStreamDecoder()
        got = [m for piece in split_every(msg * 3, size) for m in dec.feed(piece)]
        assert len(got) == 3 and dec.pending == 0
        assert got[0].headers == {"b1": True, "b0": False, "n": -5, "raw": b"\x00\x01", "id": u, "s": "é"}


@pytest.mark.parametrize("where", ["prelude", "message"])
def test_decoder_rejects_bad_crc(where: str) -> None:
    msg = bytearray(encode_message({":event-type": "messageStart"}, b'{"role":"assistant"}'))
    msg[9 if where == "prelude" else -6] ^= 0xFF
    with pytest.raises(EventStreamError):
        EventStreamDecoder().feed(bytes(msg))
    dec = br.BedrockStreamDecoder("m", True, [])
    chunks = parse_frames(dec.feed(bytes(msg)))
    assert chunks[0]["error"]["type"] == "api_error" and dec.feed(b"more") == []


@pytest.mark.parametrize("size", [1, 13, 100000])
def test_stream_decoder_is_split_independent(size: int) -> None:
    raw = encode_events(fixture_json(P, "stream_tools.json"))
    dec = br.BedrockStreamDecoder("m", True, [])
    frames = [f for piece in split_every(raw, size) for f in dec.feed(piece)] + dec.close()
    acc = accumulate(parse_frames(frames))
    assert [c["arguments"] for c in acc["choices"][0]["tool_calls"]] == ['{"city": "Paris"}', '{"city": "Tokyo"}']


# -------------------------------------------------------------------------------------------------- over the wire


async def test_plain_chat(fake: FakeUpstream) -> None:
    fx = fixture_json(P, "chat_request.json")
    res = await call(_provider(fake), "chat.completions", fx["openai"], _target(CLAUDE))
    rec = fake.received[-1]
    assert rec.path == "/model/anthropic.claude-3-5-sonnet-20240620-v1:0/converse"
    assert rec.json() == fx["upstream"]
    assert res.body is not None
    assert strip_volatile(res.body) == {
        "object": "chat.completion",
        "model": "aws/claude",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bonjour !"}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1054, "completion_tokens": 5, "total_tokens": 1059,
                  "prompt_tokens_details": {"cached_tokens": 1000}},
    }


async def test_signature_survives_url_encoding_of_arn_model_ids(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target(PROFILE_ARN))
    assert res.error is None, res.error and res.error.message
    assert "%2F" in fake.received[-1].path  # the slash inside the ARN stays encoded on the wire


async def test_without_session_token(fake: FakeUpstream) -> None:
    p = build_provider(ProviderSettings(id="aws", type="bedrock", base_url=fake.url, region=REGION,
                                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY))
    res = await call(p, "chat.completions", _chat(), _target(CLAUDE))
    assert res.error is None and "x-amz-security-token" not in fake.received[-1].headers


async def test_wrong_secret_is_rejected_by_the_fake(fake: FakeUpstream) -> None:
    res = await call(_provider(fake, aws_secret_access_key="not-the-secret"), "chat.completions", _chat(),
                     _target(CLAUDE))
    assert res.error is not None and res.error.code == "upstream_auth_failed" and res.error.status == 502
    assert "not-the-secret" not in res.error.message


async def test_streamed_answer(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target(CLAUDE), stream=True)
    assert fake.received[-1].path.endswith("/converse-stream")
    acc = accumulate(res.chunks)
    assert acc["choices"][0] == {"role": "assistant", "content": "Bonjour, le monde ! ✓", "tool_calls": [],
                                 "finish_reason": "stop"}
    assert acc["usage"] == {"prompt_tokens": 22, "completion_tokens": 9, "total_tokens": 31}
    assert res.chunks[-1]["choices"] == []
    res2 = await call(_provider(fake), "chat.completions", _chat(), _target(CLAUDE), stream=True, want_usage=False)
    assert all(c["choices"] for c in res2.chunks) and res2.usage is not None and res2.usage.total_tokens == 31


async def test_tool_call(fake: FakeUpstream) -> None:
    fx = fixture_json(P, "tools_request.json")
    res = await call(_provider(fake), "chat.completions", fx["openai"], _target(CLAUDE))
    assert res.body is not None
    choice = res.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "I'll look up both cities."
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == [
        ("tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "get_weather", '{"city":"Paris"}'),
        ("tooluse_Wq8fLFq4SgGmZ9bZzNCPtw", "get_weather", '{"city":"Tokyo"}'),
    ]
    assert res.usage is not None and res.usage.cached_tokens is None and res.usage.total_tokens == 516


async def test_streamed_parallel_tool_calls(fake: FakeUpstream) -> None:
    fx = fixture_json(P, "tools_request.json")
    res = await call(_provider(fake), "chat.completions", fx["openai"], _target(CLAUDE), stream=True)
    acc = accumulate(res.chunks)
    c0 = acc["choices"][0]
    assert c0["content"] == "Checking both." and c0["finish_reason"] == "tool_calls"
    assert [(c["id"], c["name"], orjson.loads(c["arguments"])) for c in c0["tool_calls"]] == [
        ("tooluse_P", "get_weather", {"city": "Paris"}), ("tooluse_T", "get_weather", {"city": "Tokyo"})]
    assert acc["usage"] == {"prompt_tokens": 520, "completion_tokens": 96, "total_tokens": 616,
                            "prompt_tokens_details": {"cached_tokens": 100}}


async def test_stream_exception(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target("m-exception"), stream=True)
    assert accumulate(res.chunks)["choices"][0]["content"] == "Partial"
    err = res.chunks[-1]["error"]
    assert err["type"] == "rate_limit_error" and err["message"].startswith("Too many tokens")
    assert res.decoder.error.status == 429


async def test_429_keeps_retry_after(fake: FakeUpstream) -> None:
    async def _with_retry_after(request: web.Request, rec: Received) -> web.StreamResponse:
        resp = await _handler(request, rec)
        resp.headers["Retry-After"] = "4"
        return resp

    up = await FakeUpstream(_with_retry_after).start()
    try:
        res = await call(_provider(up), "chat.completions", _chat(), _target("m-429"))
    finally:
        await up.close()
    assert isinstance(res.error, RateLimited)
    assert res.error.status == 429 and res.error.headers == {"retry-after": "4"}
    assert res.error.message == "Too many requests, please wait before trying again."


async def test_500(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target("m-500"))
    assert isinstance(res.error, UpstreamError) and (res.error.status, res.error.type) == (500, "api_error")


def test_error_mapping_table() -> None:
    p = _provider_offline()
    for name, status, etype in (("error_400.json", 400, "invalid_request_error"),
                                ("error_403.json", 502, "api_error")):
        fx = fixture_json(P, name)
        err = p.parse_error({"ValidationException": 400, "AccessDeniedException": 403}[fx["type"].split(":")[0]],
                            {"x-amzn-errortype": fx["type"]}, orjson.dumps(fx["body"]))
        assert (err.status, err.type) == (status, etype)
    timeout = p.parse_error(408, {"x-amzn-errortype": "ModelTimeoutException"}, b'{"message":"slow"}')
    assert (timeout.status, timeout.code) == (504, "upstream_timeout")


def _provider_offline() -> Any:
    return build_provider(ProviderSettings(id="aws", type="bedrock", region=REGION, aws_access_key_id=ACCESS_KEY,
                                           aws_secret_access_key=SECRET_KEY))


def test_signing_is_fast() -> None:
    p = _provider_offline()
    req = p.build_request("chat.completions", _chat(), _target(CLAUDE), False)
    t0 = time.perf_counter()
    for _ in range(200):
        p.signer.apply(req)  # re-signing replaces the previous signature headers
    assert time.perf_counter() - t0 < 1.0
    assert list(req.headers).count("authorization") == 1


def test_structured_output() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "description": "A thing", "schema": schema}}
    out = br.translate_request(_chat(response_format=rf))
    fmt = out["outputConfig"]["textFormat"]
    assert fmt["type"] == "json_schema" and orjson.loads(fmt["structure"]["jsonSchema"]["schema"]) == schema
    assert fmt["structure"]["jsonSchema"]["name"] == "thing"
    validate_bedrock_request(CLAUDE, out)
