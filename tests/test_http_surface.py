"""The HTTP surface never answers 500 (issue 9, acceptance 3).

Wrong methods on /api/* routes get 405 `method_not_allowed` with `Allow`,
unknown /api/* paths 404 `not_found`, both in SPEC's error shape. A Hypothesis
fuzz then writes whole HTTP/1.1 requests by hand over raw TCP (so that it can
send what a polite client library would not: any method, odd paths, lying
`Content-Length`, chunked bodies, garbage cookies) and checks every answer.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import string

import aiohttp
import pytest
import yarl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.storage

API_ROUTES = {
    "/api/session": {"GET", "HEAD"},
    "/api/register": {"POST"},
    "/api/login": {"POST"},
    "/api/logout": {"POST"},
}


def assert_error_shape(status: int, body: bytes, code: str | None = None) -> dict:
    answer = json.loads(body)
    assert set(answer) == {"error", "message"}, answer
    assert isinstance(answer["error"], str) and isinstance(answer["message"], str) and answer["message"]
    if code is not None:
        assert answer["error"] == code, (status, answer)
    return answer


# -- wrong methods and unknown paths ---------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [("PUT", "/api/logout"), ("GET", "/api/logout"), ("DELETE", "/api/register"), ("PATCH", "/api/login"),
     ("POST", "/api/session"), ("DELETE", "/api/session"), ("OPTIONS", "/api/session")],
)
async def test_a_wrong_method_on_an_api_route_is_405_with_allow(base_url, method, path):
    async with aiohttp.ClientSession() as http:
        # A body and a content type that POST would refuse: the method is judged first.
        async with http.request(method, base_url + path, data=b"<x/>", headers={"Content-Type": "text/xml"}) as response:
            assert response.status == 405
            assert set(response.headers["Allow"].split(",")) == API_ROUTES[path]
            assert response.content_type == "application/json"
            assert_error_shape(405, await response.read(), "method_not_allowed")


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["/api/", "/api/nope", "/api/session/extra", "/api/login/"])
@pytest.mark.parametrize("body", [None, b"{}"])
async def test_an_unknown_api_path_is_404_not_found(base_url, method, path, body):
    async with aiohttp.ClientSession() as http:
        headers = {"Content-Type": "text/plain"} if body else {}
        async with http.request(method, base_url + path, data=body, headers=headers) as response:
            assert response.status == 404
            assert response.content_type == "application/json"
            assert_error_shape(404, await response.read(), "not_found")


async def test_outside_the_api_aiohttps_own_answers_stay(base_url):
    async with aiohttp.ClientSession() as http:
        async with http.put(base_url + "/") as response:
            assert response.status == 405
        async with http.get(base_url + "/nope") as response:
            assert response.status == 404


async def test_a_preflight_from_a_foreign_origin_is_still_refused(base_url):
    async with aiohttp.ClientSession() as http:
        headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        async with http.options(base_url + "/api/login", headers=headers) as response:
            assert response.status == 403
            assert_error_shape(403, await response.read(), "forbidden_origin")


# -- the fuzz --------------------------------------------------------------------


class FakeSocket:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, *_args, **_kwargs):
        return io.BytesIO(self.data)


async def raw_request(port: int, request: bytes, half_close: bool) -> tuple[int, dict, bytes] | None:
    """Send bytes, read until the server closes; the first response, or None if it closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        if half_close:
            writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    if not data:
        return None
    response = http.client.HTTPResponse(FakeSocket(data), method="HEAD" if request.startswith(b"HEAD ") else None)
    response.begin()
    body = response.read() if not request.startswith(b"HEAD ") else b""
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


PATH_CHARS = string.ascii_letters + string.digits + "-._~%/!$&'()*+,;=:@"
QUERY_CHARS = PATH_CHARS + "?"
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)

# Mostly methods HTTP's parser knows (it refuses the others before chatd sees them).
KNOWN_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "MKCOL", "PURGE"]
methods = st.sampled_from(["POST"] * 8 + ["GET"] * 4 + KNOWN_METHODS + ["BREW"])
paths = st.one_of(
    st.sampled_from(["/api/register", "/api/login", "/api/logout", "/api/session"]),
    st.sampled_from(["/api/register", "/api/login", "/api/logout", "/api/session"]),
    st.sampled_from(
        ["/", "/api", "/api/", "/api/session", "/api/register", "/api/login", "/api/logout", "/healthz",
         "/metrics", "/static/app.js", "/static/../setup.cfg", "/api/../api/login", "/api//login", "/api/%2e%2e/x",
         "/api/login%00", "/socket.io/?EIO=4&transport=polling"]
    ),
    st.builds(lambda rest: "/api/" + rest, st.text(PATH_CHARS, max_size=30)),
    st.builds(lambda rest: "/" + rest, st.text(PATH_CHARS, max_size=30)),
)
queries = st.one_of(st.just(""), st.builds(lambda q: "?" + q, st.text(QUERY_CHARS, max_size=30)))
origins = st.one_of(
    st.none(), st.sampled_from(["OWN", "null", "https://evil.example", "http://127.0.0.1", "file://"]), HEADER_TEXT
)
content_types = st.one_of(
    st.just("application/json"),
    st.none(),
    st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
         "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin-1",
         "application/json;;", ";"]
    ),
    HEADER_TEXT,
)
json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
credentials = st.fixed_dictionaries(
    {"username": st.one_of(st.text(max_size=30), st.from_regex(r"\A[a-z][a-z0-9_.-]{2,20}\Z")),
     "password": st.text(max_size=40)}
)
bodies = st.one_of(
    st.just(b""),
    st.builds(lambda v: json.dumps(v).encode(), json_bodies | credentials),
    st.binary(max_size=200),
    st.sampled_from([b"{", b"NaN", b"[" * 5000 + b"]" * 5000, b'{"a":1}' + b" " * 17000, b"\xff\xfe{}"]),
)
# How the body's length is told: honestly, chunked, not at all, or a lie either way.
framings = st.sampled_from(["length"] * 6 + ["chunked", "none", "short", "long"])
cookies = st.one_of(st.none(), st.sampled_from(["chatd_session=", "chatd_session=garbage", "chatd_session=gAAAA"]),
                    st.builds(lambda v: "chatd_session=" + v, st.text(string.ascii_letters + "-_=", max_size=60)))
forwarded_for = st.lists(st.ip_addresses().map(str), min_size=1, max_size=3).map(", ".join) | HEADER_TEXT
forwarded_proto = st.sampled_from(["https", "http", "https, http", ""]) | HEADER_TEXT
extra_headers = st.just([]) | st.lists(
    st.one_of(
        st.tuples(st.just("X-Forwarded-For"), forwarded_for),
        st.tuples(st.just("X-Forwarded-Proto"), forwarded_proto),
        st.tuples(
            st.sampled_from(["X-Forwarded-Host", "Host", "Expect", "Accept", "Connection", "Content-Encoding",
                             "Transfer-Encoding", "Upgrade"]),
            HEADER_TEXT,
        ),
    ),
    max_size=3,
)


def build_request(port, method, path, query, origin, content_type, body, framing, cookie, extra) -> tuple[bytes, bool]:
    lines = [f"{method} {path}{query} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    if origin is not None:
        lines.append("Origin: " + (f"http://127.0.0.1:{port}" if origin == "OWN" else origin))
    if content_type is not None:
        lines.append("Content-Type: " + content_type)
    if cookie is not None:
        lines.append("Cookie: " + cookie)
    lines += [f"{name}: {value}" for name, value in extra]
    payload = body
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "short":
        lines.append(f"Content-Length: {max(0, len(body) - 3)}")
    elif framing == "long":
        lines.append(f"Content-Length: {len(body) + 10}")
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    head = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
    # A lying long length leaves the server waiting for bytes that never come: end our side.
    return head + payload, framing == "long"


def is_api_path(path: str) -> bool:
    try:
        return yarl.URL(path, encoded=True).path.startswith("/api/")
    except ValueError:
        return False


async def test_whole_random_http_requests_never_get_a_5xx_and_api_errors_have_specs_shape(start_chatd):
    # The fuzzer is a trusted proxy, so that its X-Forwarded-* headers are read too.
    base = await start_chatd(allow_origins=("http://127.0.0.1",), trusted_proxies=("127.0.0.1",))
    port = yarl.URL(base).port
    loop = asyncio.get_running_loop()
    seen: dict[int, int] = {}

    async def check(method, path, query, origin, content_type, body, framing, cookie, extra):
        request, half_close = build_request(port, method, path, query, origin, content_type, body, framing, cookie, extra)
        answer = await raw_request(port, request, half_close)
        if answer is None:
            return  # the server closed a request it could not read: no answer, and no 5xx
        status, headers, payload = answer
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (request[:300], status, payload[:300])
        # aiohttp's HTTP parser refuses unreadable requests before any route or
        # middleware sees them; only the app's answers carry chatd's security headers.
        # Likewise an `Expect` other than 100-continue gets aiohttp's 417 before any
        # middleware runs. Both are HTTP's own refusals of the request, never a 5xx.
        from_the_parser = (status == 400 and "content-security-policy" not in headers) or status == 417
        if is_api_path(path) and status >= 400 and method != "HEAD" and not from_the_parser:
            assert headers.get("content-type", "").startswith("application/json"), (request[:300], status, payload)
            answer_body = assert_error_shape(status, payload)
            if status == 405:
                assert headers.get("allow"), request[:300]
                assert answer_body["error"] == "method_not_allowed"
            if status == 404:
                assert answer_body["error"] == "not_found"

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.tuples(methods, paths, queries, origins, content_types, bodies, framings, cookies, extra_headers))
    # Each answer the handlers give, at least once whatever the draw.
    @example(("GET", "/api/session", "?x=1", None, None, b"", "none", None, []))
    @example(("POST", "/api/login", "", None, "text/plain", b"{}", "length", None, []))
    @example(("POST", "/api/login", "", None, "application/json", b'{"a":1}' + b" " * 17000, "length", None, []))
    @example(("POST", "/api/login", "", "OWN", "application/json", b'{"username":"nobody","password":"whatever1"}',
              "length", None, []))
    @example(("POST", "/api/register", "", None, "application/json; charset=utf-8",
              b'{"username":"fuzzer","password":"long enough"}', "chunked", "chatd_session=garbage", []))
    def property_holds(request):
        asyncio.run_coroutine_threadsafe(check(*request), loop).result(30)

    await asyncio.to_thread(property_holds)
    # The fuzz reached the handlers, not only the parser's refusals.
    assert {200, 201, 401, 404, 405, 413, 415} <= set(seen), seen
