"""Behind a reverse proxy (issue 9, acceptance 5): `--trusted-proxy`.

The test server listens on 127.0.0.1; a client bound to 127.0.0.1 is "the
proxy" when 127.0.0.1 is trusted, and one bound to 127.0.0.2 is a peer that is
not. Throttle and same-origin must follow the forwarded client and scheme from
trusted peers only; forged headers from anyone else change nothing.
"""

from __future__ import annotations

import aiohttp
import pytest
import socketio
import yarl

from conftest import COOKIE_NAME, SocketClient, connect_socket, polling_handshake, refusal

PASSWORD = "correct horse battery"


def client_from(address: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(address, 0)), cookie_jar=aiohttp.CookieJar(unsafe=True)
    )


async def login(http: aiohttp.ClientSession, base_url: str, password: str, headers: dict | None = None):
    body = {"username": "Frank", "password": password}
    async with http.post(base_url + "/api/login", json=body, headers=headers or {}) as response:
        return response.status, await response.json()


async def register_frank(base_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + "/api/register", json={"username": "Frank", "password": PASSWORD}) as r:
            assert r.status == 201


async def fail_five_times(http, base_url, headers) -> None:
    for i in range(5):
        assert (await login(http, base_url, f"guess {i}", headers))[0] == 401


async def test_without_trusted_proxies_forged_forwarded_for_is_ignored(start_chatd):
    base_url = await start_chatd()
    await register_frank(base_url)
    async with client_from("127.0.0.1") as http:
        for i in range(5):  # a new "address" every time: were it believed, nothing would lock
            status, _ = await login(http, base_url, f"guess {i}", {"X-Forwarded-For": f"198.51.100.{i}"})
            assert status == 401
        status, body = await login(http, base_url, PASSWORD, {"X-Forwarded-For": "198.51.100.99"})
        assert (status, body["error"]) == (429, "too_many_attempts")


async def test_the_throttle_keys_on_the_forwarded_client_behind_a_trusted_proxy(start_chatd):
    base_url = await start_chatd(trusted_proxies=("127.0.0.1",))
    await register_frank(base_url)
    async with client_from("127.0.0.1") as proxy:
        await fail_five_times(proxy, base_url, {"X-Forwarded-For": "203.0.113.5"})
        status, body = await login(proxy, base_url, PASSWORD, {"X-Forwarded-For": "203.0.113.5"})
        assert (status, body["error"]) == (429, "too_many_attempts")
        # A client can prepend anything; the proxy appends what it saw, and that counts.
        status, body = await login(proxy, base_url, PASSWORD, {"X-Forwarded-For": "192.0.2.1, 203.0.113.5"})
        assert (status, body["error"]) == (429, "too_many_attempts")
        # Another person behind the same proxy is not locked out.
        status, body = await login(proxy, base_url, PASSWORD, {"X-Forwarded-For": "203.0.113.6"})
        assert (status, body) == (200, {"name": "Frank", "account": "Frank"})


async def test_the_client_is_the_rightmost_entry_that_is_not_a_trusted_proxy(start_chatd):
    base_url = await start_chatd(trusted_proxies=("127.0.0.1", "10.0.0.0/8"))
    await register_frank(base_url)
    async with client_from("127.0.0.1") as proxy:
        # client 203.0.113.5 -> proxy 10.1.2.3 -> proxy 127.0.0.1 -> chatd
        await fail_five_times(proxy, base_url, {"X-Forwarded-For": "203.0.113.5, 10.1.2.3"})
        status, _ = await login(proxy, base_url, PASSWORD, {"X-Forwarded-For": "203.0.113.5, 10.9.9.9"})
        assert status == 429
        status, _ = await login(proxy, base_url, PASSWORD, {"X-Forwarded-For": "10.1.2.3"})
        assert status == 200  # everything trusted: the leftmost entry, not 203.0.113.5


async def test_forged_forwarded_for_from_an_untrusted_peer_is_ignored(start_chatd):
    base_url = await start_chatd(trusted_proxies=("127.0.0.1",))
    await register_frank(base_url)
    async with client_from("127.0.0.2") as stranger:
        for i in range(5):
            status, _ = await login(stranger, base_url, f"guess {i}", {"X-Forwarded-For": f"198.51.100.{i}"})
            assert status == 401
        status, _ = await login(stranger, base_url, PASSWORD, {"X-Forwarded-For": "198.51.100.99"})
        assert status == 429  # keyed on 127.0.0.2, whatever the header said
    async with client_from("127.0.0.1") as proxy:  # and the stranger's address, forwarded, is locked too
        status, _ = await login(proxy, base_url, PASSWORD, {"X-Forwarded-For": "127.0.0.2"})
        assert status == 429
        status, _ = await login(proxy, base_url, PASSWORD, {"X-Forwarded-For": "198.51.100.1"})
        assert status == 200


async def post_logout(http, base_url, headers) -> tuple[int, dict]:
    async with http.post(base_url + "/api/logout", json={}, headers=headers) as response:
        return response.status, await response.json()


async def test_same_origin_uses_the_forwarded_scheme_from_trusted_proxies_only(start_chatd):
    base_url = await start_chatd(trusted_proxies=("127.0.0.1",))
    host = yarl.URL(base_url).raw_authority
    https_page = {"Origin": f"https://{host}", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.5"}
    async with client_from("127.0.0.1") as proxy:
        assert (await post_logout(proxy, base_url, https_page))[0] == 200
        # Without the header the browser's https origin is not ours.
        no_proto = {"Origin": f"https://{host}", "X-Forwarded-For": "203.0.113.5"}
        assert (await post_logout(proxy, base_url, no_proto)) [1]["error"] == "forbidden_origin"
        # X-Forwarded-Host is never believed.
        forged_host = {**https_page, "Origin": "https://evil.example", "X-Forwarded-Host": "evil.example"}
        assert (await post_logout(proxy, base_url, forged_host))[1]["error"] == "forbidden_origin"
    async with client_from("127.0.0.2") as stranger:
        status, body = await post_logout(stranger, base_url, https_page)
        assert (status, body["error"]) == (403, "forbidden_origin")


async def test_a_socket_through_a_trusted_https_proxy_passes_the_origin_check(start_chatd):
    base_url = await start_chatd(trusted_proxies=("127.0.0.1",))
    host = yarl.URL(base_url).raw_authority
    async with aiohttp.ClientSession() as http, http.get(base_url + "/api/session") as response:
        cookie = response.cookies[COOKIE_NAME].value
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", "Origin": f"https://{host}", "X-Forwarded-For": "203.0.113.5"}
    client = SocketClient()
    try:  # (a copy of the headers: the client library changes the dict it is given)
        with pytest.raises(socketio.exceptions.ConnectionError):  # https page, but no forwarded scheme
            await client.sio.connect(base_url, headers=dict(headers), transports=["websocket"], wait_timeout=3)
    finally:
        await client.close()
    client = SocketClient()
    try:
        await client.sio.connect(
            base_url, headers={**headers, "X-Forwarded-Proto": "https"}, transports=["websocket"], wait_timeout=3
        )
        assert (await client.next("welcome"))["room"] == "general", client.connect_error
    finally:
        await client.close()


async def test_an_unreadable_forwarded_for_from_a_trusted_proxy_is_a_400_in_specs_shape(start_chatd):
    base_url = await start_chatd(trusted_proxies=("127.0.0.1",))
    async with client_from("127.0.0.1") as proxy:
        async with proxy.get(base_url + "/api/session", headers={"X-Forwarded-For": "not-an-address"}) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "invalid_request"
    async with client_from("127.0.0.2") as stranger:  # from others the header is not even read
        async with stranger.get(base_url + "/api/session", headers={"X-Forwarded-For": "not-an-address"}) as response:
            assert response.status == 200


async def test_a_trusted_proxy_that_sends_only_x_forwarded_proto_sets_the_scheme(start_chatd):
    base_url = await start_chatd(trusted_proxies=("127.0.0.1",))
    host = yarl.URL(base_url).raw_authority
    https_page = {"Origin": f"https://{host}", "X-Forwarded-Proto": "https"}  # and no X-Forwarded-For
    async with client_from("127.0.0.1") as proxy:
        assert (await post_logout(proxy, base_url, https_page))[0] == 200
        # The http origin is then not ours any more.
        status, body = await post_logout(proxy, base_url, {**https_page, "Origin": f"http://{host}"})
        assert (status, body["error"]) == (403, "forbidden_origin")
    async with client_from("127.0.0.2") as stranger:
        status, body = await post_logout(stranger, base_url, https_page)
        assert (status, body["error"]) == (403, "forbidden_origin")


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_handshake_through_a_trusted_proxy_that_sends_only_x_forwarded_proto(start_chatd, transport):
    base_url = await start_chatd(trusted_proxies=("127.0.0.1",))
    host = yarl.URL(base_url).raw_authority
    async with aiohttp.ClientSession() as http, http.get(base_url + "/api/session") as response:
        cookie = response.cookies[COOKIE_NAME].value
    https_page = {"Origin": f"https://{host}", "X-Forwarded-Proto": "https"}
    plain_http = {**https_page, "X-Forwarded-Proto": "http"}
    # The socket client connects from 127.0.0.1, the trusted proxy.
    if transport == "polling":
        assert await polling_handshake(base_url, cookie=cookie, headers=plain_http) == []  # Engine.IO's no
        assert any(p.startswith("40{") for p in await polling_handshake(base_url, cookie=cookie, headers=https_page))
        return
    assert await refusal(base_url, cookie=cookie, transport=transport, headers=plain_http) is None  # Engine.IO's no
    client = await connect_socket(base_url, cookie=cookie, transport=transport, headers=https_page)
    try:
        assert (await client.next("welcome"))["room"] == "general"
    finally:
        await client.close()


async def test_forwarded_headers_from_a_trusted_proxy_are_read_as_lists(start_chatd):
    """Several header lines are one list; the scheme is the client's hop's; anything else unreadable is a 400."""
    base_url = await start_chatd(trusted_proxies=("127.0.0.1", "10.0.0.0/8"))
    await register_frank(base_url)
    host = yarl.URL(base_url).raw_authority
    async with client_from("127.0.0.1") as proxy:
        # Two lines: "203.0.113.5" then "10.1.2.3" is the chain 203.0.113.5 -> 10.1.2.3 -> us.
        two_lines = [("X-Forwarded-For", "203.0.113.5"), ("X-Forwarded-For", "10.1.2.3")]
        for i in range(5):
            async with proxy.post(base_url + "/api/login", json={"username": "Frank", "password": f"guess {i}"},
                                  headers=two_lines) as response:
                assert response.status == 401
        status, _ = await login(proxy, base_url, PASSWORD, {"X-Forwarded-For": "203.0.113.5"})
        assert status == 429
        # client --https--> 10.1.2.3 --http--> 127.0.0.1: the client's scheme is https.
        hops = {
            "Origin": f"https://{host}", "X-Forwarded-For": "203.0.113.7, 10.1.2.3", "X-Forwarded-Proto": "https, http"
        }
        assert (await post_logout(proxy, base_url, hops))[0] == 200
        unreadable = [("X-Forwarded-Proto", "gopher"), ("X-Forwarded-Proto", ""), ("X-Forwarded-For", "203.0.113.5, ")]
        for name, value in unreadable:
            async with proxy.get(base_url + "/api/session", headers={name: value}) as response:
                assert response.status == 400, (name, value)
                assert (await response.json())["error"] == "invalid_request"
