"""New identities per client address (issue 24, "Protecting the server").

Minting a guest session (the page or an /api/* route without a valid session)
and registering draw on one token bucket per client address: `--guest-burst`,
refilled at `--guest-rate` per second, `0` off. Over it: 429
`too_many_requests` with `Retry-After`, no cookie, no account. Real chatd, real
clients; the bursts are small and the refill slow (one token per 100 s) unless
a test is about the refill. Clients bound to 127.0.0.2 / 127.0.0.3 are other
addresses.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from chatd.config import Config, ConfigError, config_from_args
from chatd.limits.memory import TokenBuckets
from conftest import COOKIE_NAME, Visitor, connect_socket, polling_handshake, refusal
from redis_service import redis_service, redis_url  # noqa: F401 (fixtures)

SLOW = 0.01  # tokens per second: none back within a test
PASSWORD = "correct horse"


def client_from(address: str = "127.0.0.1") -> aiohttp.ClientSession:
    """A client that never keeps nor sends cookies: every request of it is a first visit."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(address, 0)), cookie_jar=aiohttp.DummyCookieJar()
    )


async def first_visit(base_url: str, path: str = "/api/session", address: str = "127.0.0.1", headers=None):
    """A request without a session: (status, headers, body text)."""
    async with client_from(address) as http, http.get(base_url + path, headers=headers or {}) as response:
        return response.status, response.headers, await response.text()


async def register(base_url: str, username: str, address: str = "127.0.0.1", cookie: str | None = None):
    """POST /api/register: (status, headers, JSON body)."""
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}"} if cookie else {}
    async with client_from(address) as http:
        body = {"username": username, "password": PASSWORD}
        async with http.post(base_url + "/api/register", json=body, headers=headers) as response:
            return response.status, response.headers, await response.json()


def assert_refused(status: int, headers, body: str | dict | None = None) -> None:
    """SPEC's answer over the limit: 429, Retry-After in whole seconds, and no cookie."""
    assert status == 429, (status, body)
    assert int(headers["Retry-After"]) >= 1
    assert "Set-Cookie" not in headers


def assert_guest(status: int, headers) -> str:
    assert status == 200
    return next(v for v in headers.getall("Set-Cookie") if v.startswith(COOKIE_NAME + "="))


# -- the flags -------------------------------------------------------------------------


def test_the_flags_their_environment_variables_and_specs_defaults():
    assert (Config().guest_burst, Config().guest_rate) == (60, 0.2)
    defaults = config_from_args([], environ={})
    assert (defaults.guest_burst, defaults.guest_rate) == (60, 0.2)
    config = config_from_args(["--guest-burst", "3", "--guest-rate", "0.5"], environ={})
    assert (config.guest_burst, config.guest_rate) == (3, 0.5)
    config = config_from_args([], environ={"CHATD_GUEST_BURST": "7", "CHATD_GUEST_RATE": "0"})
    assert (config.guest_burst, config.guest_rate) == (7, 0.0)
    config = config_from_args(["--guest-rate", "1"], environ={"CHATD_GUEST_RATE": "0"})
    assert config.guest_rate == 1.0  # the flag wins
    for bad in (["--guest-burst", "0"], ["--guest-burst", "x"], ["--guest-rate", "-1"], ["--guest-rate", "nan"]):
        with pytest.raises(ConfigError):
            config_from_args(bad, environ={})


async def test_the_flags_reach_a_running_chatd(chatd_process):
    url = chatd_process("--guest-burst", "2", "--guest-rate", str(SLOW)).start()
    assert [(await first_visit(url))[0] for _ in range(3)] == [200, 200, 429]


# -- the limit -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/api/session", "/api/nowhere"])
async def test_over_the_burst_a_first_visit_is_429_with_retry_after_and_no_cookie(start_chatd, path):
    base_url = await start_chatd(guest_burst=3, guest_rate=SLOW)
    for _ in range(3):
        status, headers, _ = await first_visit(base_url, path)
        assert "Set-Cookie" in headers, status
    status, headers, text = await first_visit(base_url, path)
    assert_refused(status, headers, text)
    assert 90 <= int(headers["Retry-After"]) <= 101  # one token at 0.01 per second
    if path == "/":
        assert headers["Content-Type"].startswith("text/html")
    else:
        assert headers["Content-Type"].startswith("application/json")
        assert (await first_visit(base_url, path))[2].startswith('{"error": "too_many_requests", "message": ')
    # Another address has its own bucket.
    assert "Set-Cookie" in (await first_visit(base_url, path, address="127.0.0.2"))[1]


async def test_registering_draws_once_and_over_the_limit_creates_no_account(start_chatd):
    base_url = await start_chatd(guest_burst=4, guest_rate=SLOW)
    first, second = [assert_guest(*(await first_visit(base_url))[:2]).split(";")[0].split("=", 1)[1] for _ in "12"]
    assert (await register(base_url, "alice", cookie=first))[0] == 201  # 3: registering with a session draws
    assert (await register(base_url, "bob"))[0] == 201  # 4: without one, the guest session and the account draw once
    # Over the limit: with a valid session (refused by register itself) and without one.
    for cookie in (second, None):
        status, headers, body = await register(base_url, "carol", cookie=cookie)
        assert_refused(status, headers, body)
        assert body == {"error": "too_many_requests", "message": body["message"]}
    # No account was created: the name is free from another address.
    assert (await register(base_url, "carol", address="127.0.0.2"))[0] == 201


async def test_requests_with_a_valid_session_never_draw(start_chatd):
    base_url = await start_chatd(guest_burst=2, guest_rate=SLOW)
    alice = Visitor(base_url)
    bob = Visitor(base_url)
    try:
        await alice.register("alice")  # 1
        await bob.session()  # 2: the bucket is empty now
        assert (await first_visit(base_url))[0] == 429
        for _ in range(5):
            assert (await alice.session())["account"] == "alice"
            assert (await bob.session())["account"] is None
        async with bob.http.get(base_url + "/") as response:
            assert response.status == 200
        socket = await bob.socket()
        assert (await socket.next("welcome"))["room"] == "general"
        # Logging out gives a new guest session, and logging in an account's: neither draws.
        assert (await alice.post("/api/logout"))[0] == 200
        assert (await alice.post("/api/login", {"username": "alice", "password": PASSWORD}))[0] == 200
        assert (await alice.session())["account"] == "alice"
        assert (await first_visit(base_url))[0] == 429
    finally:
        await alice.close()
        await bob.close()


async def test_the_bucket_refills(start_chatd):
    base_url = await start_chatd(guest_burst=2, guest_rate=4.0)  # a token every 0.25 s
    assert [(await first_visit(base_url))[0] for _ in range(2)] == [200, 200]
    status, headers, _ = await first_visit(base_url)
    assert_refused(status, headers)
    assert headers["Retry-After"] == "1"  # 0.25 s, rounded up to whole seconds
    await asyncio.sleep(0.3)
    assert (await first_visit(base_url))[0] == 200
    assert (await first_visit(base_url))[0] == 429
    await asyncio.sleep(0.6)  # two tokens back, never more than the burst
    assert [(await first_visit(base_url))[0] for _ in range(3)] == [200, 200, 429]


async def test_guest_rate_0_switches_the_limit_off(start_chatd):
    base_url = await start_chatd(guest_burst=1, guest_rate=0.0)
    assert [(await first_visit(base_url))[0] for _ in range(10)] == [200] * 10
    assert [(await register(base_url, f"user{i}"))[0] for i in range(3)] == [201] * 3


@pytest.mark.parametrize(
    "transport,through", [("websocket", "direct"), ("websocket", "trusted proxy"), ("polling", "trusted proxy")]
)
async def test_a_handshake_without_a_session_is_unauthorized_and_draws_nothing(start_chatd, transport, through):
    # Directly and with a trusted proxy in front (the forwarded middleware runs first): neither draws.
    proxies = ("10.0.0.1",) if through == "trusted proxy" else ()
    base_url = await start_chatd(guest_burst=2, guest_rate=SLOW, trusted_proxies=proxies)
    no_session = {"message": "unauthorized", "data": {"reason": "no_session"}}

    async def refused() -> dict | None:
        if transport == "polling":
            answer = await polling_handshake(base_url, cookie=None)
            assert answer[0].startswith("44"), answer  # CONNECT_ERROR
            return json.loads(answer[0][2:])
        return await refusal(base_url, cookie=None, transport=transport)

    for _ in range(3):
        assert await refused() == no_session
    cookie = assert_guest(*(await first_visit(base_url))[:2]).split(";")[0].split("=", 1)[1]
    assert (await first_visit(base_url))[0] == 200  # the handshakes took nothing
    assert (await first_visit(base_url))[0] == 429
    # Over the limit: the same refusal as always, and a valid session still connects.
    assert await refused() == no_session
    if transport == "polling":
        assert any(packet.startswith("40{") for packet in await polling_handshake(base_url, cookie=cookie))  # CONNECT
        return
    client = await connect_socket(base_url, cookie=cookie, transport=transport)
    try:
        assert (await client.next("welcome"))["room"] == "general"
    finally:
        await client.close()


# -- behind a proxy --------------------------------------------------------------------


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(start_chatd):
    base_url = await start_chatd(guest_burst=2, guest_rate=SLOW, trusted_proxies=("127.0.0.1",))

    async def via_proxy(forwarded_for: str | None, address: str = "127.0.0.1") -> int:
        headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
        return (await first_visit(base_url, address=address, headers=headers))[0]

    assert [await via_proxy("203.0.113.5") for _ in range(3)] == [200, 200, 429]
    assert [await via_proxy("203.0.113.6") for _ in range(3)] == [200, 200, 429]
    # A client's own prefix changes nothing: the proxy's rightmost entry is the client.
    assert await via_proxy("198.51.100.1, 203.0.113.5") == 429
    # The proxy's own requests are its own address.
    assert await via_proxy(None) == 200
    # From a peer that is not trusted the header is ignored: one bucket for 127.0.0.2 whatever it says.
    assert [await via_proxy(f"192.0.2.{i}", address="127.0.0.2") for i in range(3)] == [200, 200, 429]
    assert await via_proxy("127.0.0.2") == 429  # and that address, forwarded, is the same bucket


async def test_processes_sharing_redis_share_one_bucket_per_address(chatd_process, tmp_path, redis_url):
    flags = ["--redis-url", redis_url, "--guest-burst", "3", "--guest-rate", str(SLOW)]
    key = {"CHATD_SECRET_KEYS": Fernet.generate_key().decode("ascii")}  # one chat: each reads the other's cookies
    a = chatd_process(*flags, data_dir=tmp_path / "a" / "data", env=key)
    b = chatd_process(*flags, data_dir=tmp_path / "b" / "data", env=key)
    url_a, url_b = a.start(), b.start()
    assert [(await first_visit(url))[0] for url in (url_a, url_b, url_a)] == [200, 200, 200]
    status, headers, _ = await first_visit(url_b)
    assert_refused(status, headers)
    assert (await first_visit(url_a))[0] == 429
    assert (await register(url_b, "alice"))[0] == 429
    assert (await first_visit(url_b, address="127.0.0.2"))[0] == 200
    # Redis holds a digest of each address, never the address, and forgets it.
    redis = Redis.from_url(redis_url)
    try:
        keys = [k.decode() for k in await redis.keys("chatd:guest:*")]
        assert len(keys) == 2 and not any("127.0.0" in k for k in keys)
        for k in keys:  # kept for as long as a bucket takes to fill again (3 / 0.01 s), then gone
            assert 0 < await redis.pttl(k) <= 301_000
    finally:
        await redis.aclose()


# -- memory ----------------------------------------------------------------------------


async def test_the_in_memory_buckets_stay_bounded():
    # A bucket idle long enough to be full is forgotten when a new key comes.
    quick = TokenBuckets(burst=1, per_second=1000.0)
    assert quick.take("a") == 0
    await asyncio.sleep(0.01)
    assert quick.take("b") == 0
    assert len(quick) == 1
    # Past `kept` buckets, the longest idle goes; the others keep what they spent.
    slow = TokenBuckets(burst=1, per_second=SLOW, kept=3)
    for key in "abcde":
        assert slow.take(key) == 0
    assert len(slow) == 3
    assert slow.take("e") > 0 and slow.take("c") > 0  # still remembered: empty
    assert slow.take("a") == 0  # forgotten: full again (looser, never stricter)
    assert len(slow) == 3
