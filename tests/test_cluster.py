"""Several chatd processes as one chat (issue 13): two `python -m chatd` processes
sharing a throwaway Redis and one PostgreSQL database, with a throwaway nginx
(ip_hash, websocket upgrade) in front (tests/cluster_service.py). Ordered delivery
across processes is tests/test_cluster_order.py.

Missing redis-server or nginx: a loud skip, or a failure under CI=true.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from cryptography.fernet import Fernet

import socketio

from cluster_service import Cluster, running_cluster, visitors  # noqa: F401 (fixture)
from conftest import RawSocket, SocketClient, Visitor, connect_socket, refusal
from redis_service import redis_service, redis_url  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster

CHAT_BURST = 4
CHAT_RATE = 0.05  # one token back every 20 s: no refill within a test
END_WITHIN = 1.0  # SPEC: a session's sockets on every process are disconnected within 1 s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_server) -> Cluster:
    flags = ["--chat-burst", str(CHAT_BURST), "--chat-rate", str(CHAT_RATE)]
    with running_cluster(tmp_path_factory.mktemp("cluster"), pg_server[0], *flags) as cluster:
        yield cluster


async def as_visitor_of(visitors, url: str, cookie: str) -> Visitor:
    """A visitor of `url` carrying a cookie issued elsewhere."""
    visitor = await visitors(url)
    visitor.http.cookie_jar.update_cookies({"chatd_session": cookie}, response_url=__import__("yarl").URL(url))
    return visitor


async def receive_until(socket, event: str, predicate, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while True:
        item = await socket.next(event, timeout=max(0.01, deadline - time.monotonic()))
        if predicate(item):
            return item


async def published_on(pubsub, wait: float = 1.0) -> list[str]:
    """Everything published on the subscribed channels until `wait` seconds from now."""
    published = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            published.append(message["data"].decode())
    return published


# -- cookies ------------------------------------------------------------------------


async def test_a_cookie_issued_by_one_process_works_on_the_other(cluster, visitors):
    alice = await visitors(cluster.a.url)
    registered = await alice.register("alice-cookie")
    on_b = await as_visitor_of(visitors, cluster.b.url, alice.cookie)
    assert (await on_b.session())["account"] == "alice-cookie"
    assert on_b.cookie == alice.cookie  # B read it; it did not issue a guest session instead
    socket = await on_b.socket()
    welcome = await socket.next("welcome")
    assert (welcome["name"], welcome["account"]) == (registered["name"], "alice-cookie")


# -- session endings -----------------------------------------------------------------


@pytest.mark.parametrize("path, reason", [("/api/logout", "logout"), ("/api/login", "login")])
async def test_ending_a_session_on_one_process_closes_its_socket_on_the_other_even_if_ignored(
    cluster, visitors, path, reason
):
    user = f"ender-{reason}"
    alice = await visitors(cluster.a.url)
    await alice.register(user)
    # A raw client on B: it answers pings and nothing else; it never closes by itself.
    raw, answer = await RawSocket.connect(cluster.b.url, alice.cookie)
    try:
        assert answer.startswith("40{"), answer
        body = {"username": user, "password": "correct horse"} if reason == "login" else {}
        status, _ = await alice.post(path, body)
        # From the answer: a login's password check (slow on purpose) comes before the ending.
        started = time.monotonic()
        assert status == 200
        packets = []
        while (packet := await raw.recv(timeout=max(0.01, started + END_WITHIN - time.monotonic()))) != "":
            if not packet.startswith('42["presence"'):  # the room's changes may come first
                packets.append(packet)
        elapsed = time.monotonic() - started
    finally:
        await raw.close()
    assert packets[0] == f'42["session_ended",{{"reason":"{reason}"}}]', packets
    assert "41" in packets, packets  # the Socket.IO disconnect
    assert elapsed < END_WITHIN, f"the transport closed {elapsed:.2f} s after the {reason}"


async def test_a_polling_client_that_ignores_the_ending_is_cut_off_on_the_other_process(cluster, visitors):
    """A raw polling client on B that keeps polling as if nothing happened: within 1 s of
    the logout through A, B refuses its polls (its Engine.IO session is gone)."""
    import aiohttp

    alice = await visitors(cluster.a.url)
    await alice.register("polling-ignorer")
    async with aiohttp.ClientSession(cookies={"chatd_session": alice.cookie}) as http:
        async with http.get(cluster.b.url + "/socket.io/?EIO=4&transport=polling") as response:
            sid = json.loads((await response.text())[1:])["sid"]
        poll_url = cluster.b.url + f"/socket.io/?EIO=4&transport=polling&sid={sid}"
        async with http.post(poll_url, data="40") as response:
            assert response.status == 200
        async with http.get(poll_url) as response:  # the CONNECT answer (and welcome)
            assert "40{" in await response.text()
        status, _ = await alice.post("/api/logout")
        assert status == 200
        started = time.monotonic()
        received, refused = "", None
        while time.monotonic() - started < END_WITHIN + 0.5:
            async with http.get(poll_url) as response:
                if response.status != 200:
                    refused = time.monotonic() - started
                    break
                received += await response.text()
        assert '42["session_ended",{"reason":"logout"}]' in received, received
        assert refused is not None and refused < END_WITHIN, (refused, received)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_logout_on_one_process_ends_the_sessions_sockets_on_both(cluster, visitors, transport):
    alice = await visitors(cluster.a.url)
    await alice.register(f"both-{transport}")
    on_a = await alice.socket(transport=transport)
    on_b = await connect_socket(cluster.b.url, cookie=alice.cookie, transport=transport)
    try:
        started = time.monotonic()
        status, _ = await alice.post("/api/logout")
        assert status == 200
        for socket in (on_a, on_b):
            remaining = max(0.01, started + END_WITHIN - time.monotonic())
            assert await socket.next("session_ended", timeout=remaining) == {"reason": "logout"}
            await asyncio.wait_for(socket.disconnected.wait(), max(0.01, started + END_WITHIN - time.monotonic()))
    finally:
        await on_b.close()


async def test_a_logout_during_handshakes_leaves_no_socket_of_the_session_connected(base_url, visitors):
    """One process: handshakes under way while the session is logged out (the race
    between reading the cookie and joining the session's room) all end refused or ended."""
    visitor = await visitors(base_url)
    await visitor.register("racer")
    clients = [SocketClient() for _ in range(24)]
    cookie = visitor.cookie

    async def connect(client: SocketClient, delay: float) -> None:
        await asyncio.sleep(delay)  # spread over the moment of the logout
        try:
            # A dict per client: the Engine.IO client takes the Cookie header out of the one it gets.
            headers = {"Cookie": f"chatd_session={cookie}"}
            await client.sio.connect(base_url, headers=headers, transports=["websocket"], wait_timeout=5)
        except socketio.exceptions.ConnectionError:
            pass  # refused: revoked

    connecting = [asyncio.create_task(connect(client, i * 0.005)) for i, client in enumerate(clients)]
    try:
        await asyncio.sleep(0.06)  # some handshakes done, some under way, some not started
        status, _ = await visitor.post("/api/logout")
        assert status == 200
        await asyncio.gather(*connecting)
        await asyncio.sleep(END_WITHIN + 0.2)
        assert [client.sio.connected for client in clients] == [False] * len(clients)
        for client in clients:  # each was refused as revoked, or told its session ended
            ended = not client.queues["session_ended"].empty()
            refused = client.connect_error == {"message": "unauthorized", "data": {"reason": "revoked"}}
            assert ended or refused, (client.connect_error, client.drain("session_ended"))
    finally:
        for client in clients:
            await client.close()


# -- rate limits ---------------------------------------------------------------------


async def test_one_sessions_chat_limit_holds_across_its_sockets_on_two_processes(cluster, visitors):
    alice = await visitors(cluster.a.url)
    on_a = await alice.socket()
    on_b = await connect_socket(cluster.b.url, cookie=alice.cookie)
    try:
        acks = []
        for i in range(2 * CHAT_BURST):
            acks.append(await (on_a, on_b)[i % 2].call("send chat", {"msg": f"burst {i}"}))
        sent = [ack for ack in acks if ack.get("ok")]
        limited = [ack for ack in acks if ack.get("error") == "rate_limited"]
        assert len(sent) == CHAT_BURST and len(limited) == CHAT_BURST, acks
        assert acks[:CHAT_BURST] == sent  # the first ones pass, on both processes
        assert all(0 < ack["retry_after"] <= 1 / CHAT_RATE for ack in limited), limited
        # Another session has its own bucket, on either process.
        bob = await visitors(cluster.b.url)
        assert (await (await bob.socket()).call("send chat", {"msg": "hi"}))["ok"] is True
    finally:
        await on_b.close()


async def test_the_login_throttle_holds_across_processes(cluster, visitors):
    owner = await visitors(cluster.a.url)
    await owner.register("throttled")
    a, b = await visitors(cluster.a.url), await visitors(cluster.b.url)
    for i in range(5):
        status, body = await (a, b)[i % 2].post("/api/login", {"username": "throttled", "password": "wrong password"})
        assert (status, body["error"]) == (401, "invalid_credentials"), (i, status, body)
    for visitor in (a, b):
        # Now refused on both, even with the right password and another case of the name.
        async with visitor.http.post(
            visitor.base_url + "/api/login", json={"username": "THROTTLED", "password": "correct horse"}
        ) as response:
            assert response.status == 429
            assert (await response.json())["error"] == "too_many_attempts"
            assert 0 < int(response.headers["Retry-After"]) <= 15 * 60
    # Another username from the same address is unaffected.
    other = await visitors(cluster.b.url)
    await other.register("not-throttled")
    status, _ = await other.post("/api/login", {"username": "not-throttled", "password": "correct horse"})
    assert status == 200


async def test_a_successful_login_on_one_process_clears_the_failures_on_the_other(cluster, visitors):
    await (await visitors(cluster.b.url)).register("forgiven")  # one account, in the shared storage
    a, b = await visitors(cluster.a.url), await visitors(cluster.b.url)
    for _ in range(4):
        status, _ = await a.post("/api/login", {"username": "forgiven", "password": "wrong password"})
        assert status == 401
    status, _ = await b.post("/api/login", {"username": "forgiven", "password": "correct horse"})
    assert status == 200
    for _ in range(5):  # a fresh window: five more failures before any 429
        status, _ = await a.post("/api/login", {"username": "forgiven", "password": "wrong password"})
        assert status == 401


# -- broadcasts through nginx -----------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_broadcasts_from_both_processes_reach_a_socket_behind_nginx(cluster, visitors, transport):
    """The receiver is on whichever process nginx picked; one sender is on each process,
    so one of the two messages crossed through Redis."""
    carol = await visitors(cluster.nginx.url)
    receiver = await carol.socket(transport=transport)
    await receiver.next("welcome")
    sent = {}
    for process in cluster.processes:
        sender = await visitors(process.url)
        socket = await sender.socket()
        ack = await socket.call("send chat", {"msg": f"from {process.port} over {transport}"})
        assert ack["ok"] is True, ack
        sent[ack["id"], f"from {process.port} over {transport}"] = process
    texts = {text for _, text in sent}
    got = set()
    deadline = time.monotonic() + 3.0
    while got != texts:
        message = await receiver.next("new chat", timeout=max(0.01, deadline - time.monotonic()))
        if message["msg"] in texts:
            assert message["msg"] not in got, f"delivered twice: {message}"
            got.add(message["msg"])
    await receiver.nothing("new chat", wait=0.3)  # and nothing more (no echo through Redis)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_browser_origin_passes_the_same_origin_check_through_nginx(cluster, visitors, transport):
    """nginx must pass the Host with its port: the browser's Origin carries it."""
    visitor = await visitors(cluster.nginx.url)
    await visitor.session()
    origin = {"Origin": cluster.nginx.url}
    status, body = await visitor.post(
        "/api/register", {"username": f"origin-{transport}", "password": "correct horse"}, headers=origin
    )
    assert status == 201, body
    socket = await connect_socket(cluster.nginx.url, cookie=visitor.cookie, transport=transport, headers=origin)
    try:
        assert (await socket.next("welcome"))["account"] == f"origin-{transport}"
    finally:
        await socket.close()


async def test_only_room_broadcasts_cross_redis_not_what_is_meant_for_one_socket(cluster, visitors):
    """`welcome`, acks and `chat_error` go to one socket of this process: publishing them
    would make every other process decode them for nothing."""
    from redis.asyncio import Redis

    redis = Redis.from_url(cluster.redis.url)
    pubsub = redis.pubsub()
    await pubsub.subscribe("chatd")
    try:
        visitor = await visitors(cluster.a.url)
        socket = await visitor.socket()
        await socket.next("welcome")
        await socket.emit("send chat", {"msg": ""})  # no ack: a chat_error to this socket
        await socket.next("chat_error")
        ack = await socket.call("send chat", {"msg": "for the room"})
        assert ack["ok"] is True
        published = await published_on(pubsub)
        # The stored message goes out once, as a control message every process's sequencer
        # reads (not also as an emit, which would reach the other process's sockets unordered).
        chats = [json.loads(data) for data in published if "for the room" in data]
        assert len(chats) == 1 and chats[0][0] == "chatd" and chats[0][2] == "change", published
        assert chats[0][3]["kind"] == "new"
        assert chats[0][3]["message"] == {**chats[0][3]["message"], "id": ack["id"], "msg": "for the room"}
        assert not any('"welcome"' in data or '"chat_error"' in data or '"new chat"' in data for data in published)
    finally:
        await pubsub.aclose()
        await redis.aclose()


# -- rooms that follow the person (issue 20) ------------------------------------------------


async def test_a_join_leave_and_read_on_one_process_reach_the_accounts_sockets_on_the_other(cluster, visitors):
    alice = await visitors(cluster.a.url)
    await alice.register("follow-alice")
    phone = await visitors(cluster.b.url)  # another session of the account, on B
    status, _ = await phone.post("/api/login", {"username": "follow-alice", "password": "correct horse"})
    assert status == 200
    on_a, on_b = await alice.socket(), await phone.socket()
    for socket in (on_a, on_b):
        await socket.next("welcome")

    started = time.monotonic()
    assert (await on_a.call("join", {"room": "across"}))["ok"] is True
    assert await on_b.next("joined", timeout=END_WITHIN) == {"room": "across"}
    assert time.monotonic() - started < END_WITHIN
    # B's socket is in the room: it hears what is sent there, and the sender's marker moving.
    sent = await on_a.call("send chat", {"room": "across", "msg": "from A"})
    assert (await on_b.next("new chat"))["id"] == sent["id"]
    mine = {"room": "across", "last_id": sent["id"], "read_id": sent["id"], "unread": 0, "mentions": 0}
    assert await on_b.next("room state", timeout=END_WITHIN) == mine

    bob = await visitors(cluster.b.url)
    bob_socket = await bob.socket()
    await bob_socket.next("welcome")
    assert (await bob_socket.call("join", {"room": "across"}))["ok"] is True
    ids = [(await bob_socket.call("send chat", {"room": "across", "msg": f"b{i}"}))["id"] for i in range(2)]
    read = await on_a.call("read", {"room": "across", "id": ids[0]})
    assert read == {"ok": True, "room": "across", "last_id": ids[1], "read_id": ids[0], "unread": 1, "mentions": 0}
    assert await on_b.next("room state", timeout=END_WITHIN) == {k: v for k, v in read.items() if k != "ok"}

    assert await on_b.call("leave", {"room": "across"}) == {"ok": True}
    assert await on_a.next("left", timeout=END_WITHIN) == {"room": "across", "reason": "left"}
    assert (await on_a.call("send chat", {"room": "across", "msg": "x"}))["error"] == "not_in_room"


async def test_a_session_ending_crosses_redis_without_the_session_id(cluster, visitors):
    """Session ids are secrets: what goes over Redis names the session by a digest."""
    import json

    from redis.asyncio import Redis

    redis = Redis.from_url(cluster.redis.url)
    pubsub = redis.pubsub()
    await pubsub.subscribe("chatd")
    try:
        alice = await visitors(cluster.a.url)
        await alice.register("secret-sid")
        sid = json.loads(Fernet(cluster.key).decrypt(alice.cookie.encode()))["session"]["sid"]
        on_b = await connect_socket(cluster.b.url, cookie=alice.cookie)
        status, _ = await alice.post("/api/logout")
        assert status == 200
        assert await on_b.next("session_ended") == {"reason": "logout"}
        published = await published_on(pubsub)
        assert any('"end_session"' in data for data in published), published
        assert not any(sid in data for data in published), published
        await on_b.close()
    finally:
        await pubsub.aclose()
        await redis.aclose()


async def test_nginx_passes_the_session_cookie_and_the_api_through(cluster, visitors):
    visitor = await visitors(cluster.nginx.url)
    session = await visitor.session()
    assert session["account"] is None and visitor.cookie
    status, body = await visitor.post("/api/register", {"username": "via-nginx", "password": "correct horse"})
    assert (status, body["account"]) == (201, "via-nginx")
    # The cookie nginx handed over is read by both processes directly.
    for process in cluster.processes:
        direct = await as_visitor_of(visitors, process.url, visitor.cookie)
        assert (await direct.session())["account"] == "via-nginx"


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_cookie_revoked_through_one_process_is_refused_by_both(cluster, visitors, transport):
    alice = await visitors(cluster.a.url)
    await alice.register(f"revoked-{transport}")
    cookie = alice.cookie
    for process in cluster.processes:  # good on both first
        assert (await (await as_visitor_of(visitors, process.url, cookie)).session())["account"] == f"revoked-{transport}"
    status, _ = await alice.post("/api/logout")
    assert status == 200 and alice.cookie != cookie
    for process in cluster.processes:
        # The socket handshake is refused as revoked …
        refused = await refusal(process.url, cookie=cookie, transport=transport)
        assert refused == {"message": "unauthorized", "data": {"reason": "revoked"}}, (process.url, refused)
        # … and HTTP treats the cookie as no session: a new guest one instead.
        stale = await as_visitor_of(visitors, process.url, cookie)
        assert (await stale.session())["account"] is None
        assert stale.cookie != cookie


# -- the Redis limits on their own, and start-up --------------------------------------


async def test_the_redis_token_bucket_refills_and_can_be_switched_off(redis_url):
    from redis.asyncio import Redis

    from chatd.limits.redis import RedisChatRateLimiter

    redis = Redis.from_url(redis_url)
    try:
        limiter = RedisChatRateLimiter(redis, burst=3, per_second=10.0)
        assert [await limiter.take("s1") for _ in range(3)] == [0.0, 0.0, 0.0]
        wait = await limiter.take("s1")
        assert 0 < wait <= 0.1
        assert await limiter.take("s2") == 0.0  # another session, another bucket
        await asyncio.sleep(wait + 0.05)
        assert await limiter.take("s1") == 0.0  # refilled
        off = RedisChatRateLimiter(redis, burst=1, per_second=0)
        assert [await off.take("s3") for _ in range(5)] == [0.0] * 5
        # Keys never hold the session id itself, and expire.
        keys = [key.decode() for key in await redis.keys("*")]
        assert keys and not any("s1" in key for key in keys)
        assert all([await redis.pttl(key) > 0 for key in keys])
    finally:
        await redis.aclose()


def test_an_unreachable_redis_stops_start_up_with_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, free_port

    closed = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "chatd", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
         "--redis-url", f"redis://:secret-password@127.0.0.1:{closed}/0"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"chatd: cannot reach Redis at 127.0.0.1:{closed}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "secret-password" not in result.stderr + result.stdout


async def test_while_redis_is_down_the_limits_fall_back_to_each_process(redis_service):
    from redis.asyncio import Redis

    from chatd.limits.redis import RedisChatRateLimiter, RedisLoginThrottle

    redis = Redis.from_url(redis_service.url, socket_connect_timeout=1)
    try:
        limiter = RedisChatRateLimiter(redis, burst=2, per_second=0.01)
        throttle = RedisLoginThrottle(redis, allowed=2)
        redis_service.stop()
        # Still limited (by this process alone), and no error reaches the caller.
        assert [await limiter.take("s") > 0 for _ in range(3)] == [False, False, True]
        assert [await throttle.attempt(("bob", "10.0.0.1")) for _ in range(2)] == [0, 0]
        assert await throttle.attempt(("bob", "10.0.0.1")) > 0
        await throttle.succeeded(("bob", "10.0.0.1"))
        assert await throttle.attempt(("bob", "10.0.0.1")) == 0
    finally:
        await redis.aclose()
