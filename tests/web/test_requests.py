"""Request checks before a body reaches the gateway: Content-Type, Host, JSON depth, Expect, 405, readiness."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from llm_proxy.types import Principal
from llm_proxy.web.json_depth import ORJSON_MAX_DEPTH, deeper_than

from ..conftest import Emulator, basic_config
from ..helpers import ProxyServer, native_config
from .rawhttp import Reply, connect, exchange, read_reply
from .test_protocol import RecordingAuth, envelope

CHAT = b'{"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'


def post(px: ProxyServer, body: bytes, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions",
         host: str = "127.0.0.1") -> Reply:
    hdrs = {"Host": f"{host}:{px.port}", "Content-Type": "application/json", **(headers or {})}
    lines = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items() if v is not None)
    head = f"POST {path} HTTP/1.1\r\n{lines}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return exchange(px.port, head.encode() + body)


def get(px: ProxyServer, path: str, host: str = "127.0.0.1", headers: dict[str, str] | None = None) -> Reply:
    lines = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return exchange(px.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{lines}Connection: close\r\n\r\n".encode())


# ---- Content-Type ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   "text/json", None])
def test_json_endpoints_refuse_other_content_types_in_none_mode(
    proxy: ProxyServer, emulator: Emulator, ctype: str | None
) -> None:
    # What a web page can send to a loopback proxy without a CORS preflight (no type at all: a Blob body).
    reply = post(proxy, CHAT, {"Content-Type": ctype})  # type: ignore[dict-item]
    envelope(reply, 415, "unsupported_media_type")
    assert emulator.requests() == []  # no provider credit spent


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8", "Application/JSON",
                                   "application/vnd.api+json"])
def test_json_content_types_are_accepted(proxy: ProxyServer, ctype: str) -> None:
    assert post(proxy, CHAT, {"Content-Type": ctype}).status == 200


def test_missing_content_type_is_accepted_when_callers_authenticate(emulator: Emulator) -> None:
    # A browser cannot attach a bearer token cross-site without a preflight, so a body without a type is
    # taken as JSON (as llama-stack's FastAPI does) in the authenticated modes; text/plain still is not.
    text = basic_config(emulator.base_url).replace(
        "auth: {mode: none, allow_unauthenticated: true}", "auth: {mode: trusted_header, trusted_header: {secret: s}}")
    with ProxyServer(native_config(text), authenticator=RecordingAuth()) as px:
        auth = {"Authorization": "Bearer t"}
        assert post(px, CHAT, {**auth, "Content-Type": None}).status == 200  # type: ignore[dict-item]
        envelope(post(px, CHAT, {**auth, "Content-Type": "text/plain"}), 415, "unsupported_media_type")
        assert post(px, CHAT, {**auth, "Host": "llm-proxy.example.svc"}).status == 200  # no Host check here


def test_the_openai_sdk_still_works(proxy: ProxyServer) -> None:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    reply = client.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    client = openai.OpenAI(base_url=f"http://localhost:{proxy.port}/v1", api_key="k", max_retries=0)
    assert client.embeddings.create(model="openai/text-embedding-3-small", input="x").data


# ---- Host -------------------------------------------------------------------------------------------


def test_none_mode_refuses_foreign_host_names(proxy: ProxyServer, emulator: Emulator) -> None:
    # DNS rebinding: a page on evil.example re-resolves its own name to 127.0.0.1 and posts to it.
    envelope(post(proxy, CHAT, host="evil.example"), 421, "host_not_allowed")
    envelope(get(proxy, "/v1/models", host="evil.example"), 421, "host_not_allowed")
    assert emulator.requests() == []
    for host in ("127.0.0.1", "localhost", "LOCALHOST.", "[::1]", "127.0.0.2", "app.localhost"):
        assert post(proxy, CHAT, host=host).status == 200, host
    # Probes are not refused (they name the pod's address), but see no details (test_readiness_*).
    assert get(proxy, "/v1/health/ready", host="evil.example").status == 200


def test_allowed_hosts_extends_the_loopback_names(emulator: Emulator) -> None:
    cfg = basic_config(emulator.base_url, "server: {allowed_hosts: [proxy.dev.example, .corp.example]}")
    with ProxyServer(native_config(cfg)) as px:
        for host in ("proxy.dev.example", "a.corp.example", "corp.example", "localhost"):
            assert post(px, CHAT, host=host).status == 200, host
        envelope(post(px, CHAT, host="evil.example"), 421, "host_not_allowed")
        envelope(post(px, CHAT, host="xcorp.example"), 421, "host_not_allowed")


def test_allowed_hosts_star_and_exposed_unauthenticated_servers_take_any_host(emulator: Emulator) -> None:
    for extra in ("server: {allowed_hosts: ['*']}", "server: {allow_non_loopback_unauthenticated: true}"):
        with ProxyServer(native_config(basic_config(emulator.base_url, extra))) as px:
            assert post(px, CHAT, host="llm-proxy.konveyor.svc").status == 200, extra


# ---- deep JSON --------------------------------------------------------------------------------------


def nested(depth: int) -> Any:
    """A JSON schema whose object nests `depth` levels deep."""
    o: Any = {"type": "string"}
    for _ in range(depth - 1):
        o = {"type": "object", "properties": {"a": o}} if len(json.dumps(o)) % 2 else [o]
    return o


def depth_of(o: Any) -> int:
    if isinstance(o, dict):
        return 1 + max((depth_of(v) for v in o.values()), default=0)
    if isinstance(o, list):
        return 1 + max((depth_of(v) for v in o), default=0)
    return 0


def chat_with(**extra: Any) -> bytes:
    return orjson.dumps({"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}], **extra})


@pytest.mark.parametrize("depth", [65, 300, 1000])
def test_deep_json_is_400(proxy: ProxyServer, emulator: Emulator, depth: int) -> None:
    # 255-1023 levels passed orjson.loads and failed orjson.dumps when the request was rebuilt: a 500.
    n = depth - 2  # the body and metadata are two levels
    body = chat_with(metadata={"k": "K"}).replace(b'"K"', b"[" * n + b"]" * n)
    orjson.loads(body)  # valid JSON (orjson parses up to 1024 levels)
    err = envelope(post(proxy, body), 400, "json_too_deep")
    assert "64" in err["message"]
    assert emulator.requests() == []


def test_deep_tool_schema_is_400_and_64_levels_pass(proxy: ProxyServer) -> None:
    def tools(schema: Any) -> bytes:
        return chat_with(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])

    for depth in range(40, 80):
        body = tools(nested(depth))
        if depth_of(orjson.loads(body)) == 64:
            assert post(proxy, body).status == 200
        elif depth_of(orjson.loads(body)) == 65:
            envelope(post(proxy, body), 400, "json_too_deep")


def test_orjson_serializes_exactly_ORJSON_MAX_DEPTH_levels() -> None:
    # deeper_than() relies on where orjson.dumps stops; orjson is pinned, this pins the number.
    o: Any = 1
    for _ in range(ORJSON_MAX_DEPTH):
        o = [o]
    orjson.dumps(o)
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps([o])


def test_deeper_than_matches_a_walk() -> None:
    cases: list[Any] = [{}, [], "s", 1, {"a": [1, {"b": "[[[[{{{{"}]}, [[[[]]]], nested(30), nested(64), nested(65)]
    cases += [{"x": "\\\"[[[", "y": [[{"z": '"]]]]'}]]}, [nested(10), [nested(70)]]]
    for limit in (8, 10, 30, 64, 65, 128):
        for o in cases:
            raw = orjson.dumps(o)
            assert deeper_than(orjson.loads(raw), raw, limit) == (depth_of(o) > limit), (limit, raw[:60])


# ---- Expect: 100-continue --------------------------------------------------------------------------


def test_expect_continue_over_the_limit_gets_413_and_no_100(emulator: Emulator) -> None:
    with ProxyServer(native_config(basic_config(emulator.base_url, "server: {max_body_bytes: 4096}"))) as px:
        with connect(px.port) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
            reply = read_reply(s, until_complete=True)
        assert b"100 Continue" not in reply.raw
        envelope(reply, 413, "request_too_large")


def test_expect_continue_within_the_limit_is_asked_for_then_served(proxy: ProxyServer) -> None:
    with connect(proxy.port) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(CHAT)}\r\nExpect: 100-continue\r\n\r\n".encode())
        s.settimeout(10)
        interim = s.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(CHAT)
        assert read_reply(s, until_complete=True).status == 200


def test_other_expectations_get_417(proxy: ProxyServer) -> None:
    reply = post(proxy, CHAT, {"Expect": "something-else"})
    envelope(reply, 417, "expectation_failed")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages",
                                  "/v1/messages/count_tokens"])
def test_expect_continue_without_a_token_gets_401_first(emulator: Emulator, path: str) -> None:
    text = basic_config(emulator.base_url).replace(
        "auth: {mode: none, allow_unauthenticated: true}", "auth: {mode: trusted_header, trusted_header: {secret: s}}")
    with ProxyServer(native_config(text), authenticator=RecordingAuth()) as px, connect(px.port) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n".encode()
                  + b"Content-Length: 50\r\nExpect: 100-continue\r\n\r\n")
        reply = read_reply(s, until_complete=True)
    assert b"100 Continue" not in reply.raw and reply.status == 401


# ---- 405 --------------------------------------------------------------------------------------------


def test_405_names_the_allowed_methods(proxy: ProxyServer) -> None:
    reply = get(proxy, "/v1/embeddings")
    envelope(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "POST"
    reply = post(proxy, b"{}", path="/v1/models")
    envelope(reply, 405, "method_not_allowed")
    assert set(reply.headers["allow"].split(",")) == {"GET", "HEAD"}


# ---- body errors -------------------------------------------------------------------------------


def test_undecodable_body_is_400_not_500(proxy: ProxyServer, caplog: pytest.LogCaptureFixture) -> None:
    # aiohttp decompresses bodies: bad gzip surfaces as RequestPayloadError while reading (was a 500).
    reply = post(proxy, b"this is not gzip at all", {"Content-Encoding": "gzip"})
    envelope(reply, 400, "invalid_body")
    assert not [r for r in caplog.records if r.getMessage() == "unhandled error"]


# ---- readiness details -----------------------------------------------------------------------------


@pytest.fixture
def remote_view(proxy: ProxyServer) -> Iterator[None]:
    """Play a caller on another machine: the proxy's "is this request local?" answers no."""
    svc = proxy.services
    local = svc.is_local
    svc.is_local = lambda request: False
    yield
    svc.is_local = local


def test_readiness_details_are_for_local_callers(proxy: ProxyServer) -> None:
    reply = get(proxy, "/v1/health/ready")
    assert reply.status == 200 and "checks" in json.loads(reply.body)


def test_readiness_hides_details_from_remote_callers(proxy: ProxyServer, remote_view: None) -> None:
    reply = get(proxy, "/v1/health/ready")
    assert reply.status == 200
    assert json.loads(reply.body) == {"status": "OK", "failing": [], "details": "hidden"}


def test_readiness_details_need_a_loopback_host_name_too(proxy: ProxyServer) -> None:
    # A page that rebinds its name to 127.0.0.1 connects from loopback but sends its own Host.
    reply = get(proxy, "/v1/health/ready", host="evil.example")
    assert json.loads(reply.body)["details"] == "hidden"


def test_readiness_details_for_authenticated_remote_callers(emulator: Emulator) -> None:
    text = basic_config(emulator.base_url).replace(
        "auth: {mode: none, allow_unauthenticated: true}", "auth: {mode: trusted_header, trusted_header: {secret: s}}")

    ops = RecordingAuth(Principal(subject="ops", username="ops", auth_method="trusted_header"))
    with ProxyServer(native_config(text), authenticator=ops) as px:
        px.services.is_local = lambda request: False
        assert json.loads(get(px, "/v1/health/ready").body)["details"] == "hidden"
        body = json.loads(get(px, "/v1/health/ready", headers={"Authorization": "Bearer t"}).body)
        assert "checks" in body and "providers" in body["checks"]


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the address of the default route
        except OSError:
            return None
        addr: str = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def test_readiness_from_another_address_of_this_machine(emulator: Emulator) -> None:
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address")
    cfg = basic_config(emulator.base_url, "server: {allow_non_loopback_unauthenticated: true}")
    with ProxyServer(native_config(cfg), host=addr) as px:
        reply = exchange(px.port, f"GET /v1/health/ready HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode(),
                         host=addr, close_after=True)
        assert reply.status == 200
        assert json.loads(reply.body) == {"status": "OK", "failing": [], "details": "hidden"}


# ---- a body that came whole with its head (read_json takes it without request.read(); a body that comes
# after the head, as in test_expect_continue_within_the_limit_is_asked_for_then_served, takes request.read())


@pytest.mark.parametrize(("size", "status"), [(2048, 400), (2049, 413)])
def test_a_whole_chunked_body_is_held_to_the_limit(emulator: Emulator, size: int, status: int) -> None:
    # Head and chunked body in one write: the body is complete before the handler reads it.
    body = b"[" + b" " * (size - 2) + b"]"  # valid JSON, not an object: 400 when within the limit
    with ProxyServer(native_config(basic_config(emulator.base_url, "server: {max_body_bytes: 2048}"))) as px:
        reply = exchange(px.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n" % size + body + b"\r\n0\r\n\r\n", close_after=True)
    assert reply.status == status
    assert orjson.loads(reply.body)["error"]["code"] == ("invalid_json" if status == 400 else "request_too_large")

