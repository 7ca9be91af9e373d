"""Attacks from real advisories of chatd's stack (issue 24, acceptance 3).

Each test is an attack that worked on some version of a library chatd uses, or
on a server built like chatd, and fails if the hole opens here:

- Cross-site websocket hijacking: a page on another site opens a socket that
  rides the visitor's cookie (Phoenix GHSA-p8f7-22gq-m7j9; socket.io
  CVE-2020-28481, whose default CORS let any origin in). On both transports, on
  each process of a cluster and through nginx.
- Someone else's message in chatd's Redis channel (python-socketio
  CVE-2025-61765: its pub/sub managers unpickled what they read): non-JSON,
  pickle bytes that would run a command, wrong shapes, a huge one. Dropped and
  logged, never run, never fatal, and nothing published afterwards is lost.
- Malformed and oversized Engine.IO/Socket.IO packets on both transports
  (engine.io CVE-2020-36048: a huge payload took the process down;
  CVE-2022-21676: a malformed one threw an uncaught exception; socket.io
  CVE-2024-38355: an ack id that was not one, same), fuzzed with Hypothesis:
  the process survives and nobody else notices.
- HTTP request heads that crashed or hung aiohttp (header floods, many
  trailers, a repeated `Host`: the shapes of CVE-2026-22815/34525) get a 4xx,
  never a 5xx or a hang; a head sent a byte at a time is dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.sessions import COOKIE_NAME

from cluster_service import Cluster, running_cluster
from conftest import ChatdProcess, connect_socket
from engineio_clients import RECORD_SEPARATOR, RawPollingClient, RawWebsocketClient

FOREIGN_ORIGINS = ["https://evil.example", "null", "http://127.0.0.1.evil.example"]
EIO = "/socket.io/?EIO=4&transport="


async def guest_cookie(http: aiohttp.ClientSession, url: str) -> str:
    """A new guest session's cookie (asked without any cookie)."""
    async with http.get(url + "/api/session", headers={"Cookie": ""}) as response:
        assert response.status == 200
        return response.cookies[COOKIE_NAME].value


# -- foreign origins, on every process and behind nginx ---------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_server) -> Cluster:
    with running_cluster(tmp_path_factory.mktemp("attacks"), pg_server[0], "--chat-rate", "0") as cluster:
        yield cluster


async def polling_open(http, url: str, cookie: str, origin: str) -> tuple[int, str]:
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", "Origin": origin}
    async with http.get(url + EIO + "polling", headers=headers) as response:
        return response.status, await response.text()


async def websocket_open(http, url: str, cookie: str, origin: str) -> int:
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}", "Origin": origin}
    try:
        ws = await http.ws_connect(url + EIO + "websocket", headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


@pytest.mark.parametrize("target", ["a", "b", "nginx"])
async def test_a_handshake_from_a_foreign_origin_is_refused_on_both_transports(cluster, target):
    url = getattr(cluster, target).url
    async with aiohttp.ClientSession() as http:
        cookie = await guest_cookie(http, url)
        # The page's own origin gets in (so a refusal below is about the origin)...
        status, text = await polling_open(http, url, cookie, url)
        assert status == 200 and text.startswith("0{"), (status, text)
        assert await websocket_open(http, url, cookie, url) == 101
        # ...another site's page, carrying the same cookie, does not.
        for origin in FOREIGN_ORIGINS:
            status, text = await polling_open(http, url, cookie, origin)
            assert status == 400 and '"sid"' not in text, (origin, status, text)
            assert await websocket_open(http, url, cookie, origin) == 400, origin


async def test_a_foreign_origin_cannot_use_a_polling_session_opened_by_the_page(cluster):
    url = cluster.a.url
    async with aiohttp.ClientSession() as http:
        cookie = await guest_cookie(http, url)
        status, text = await polling_open(http, url, cookie, url)
        sid = json.loads(text[1:])["sid"]
        for origin in FOREIGN_ORIGINS:
            headers = {"Cookie": f"{COOKIE_NAME}={cookie}", "Origin": origin}
            async with http.post(url + EIO + f"polling&sid={sid}", data="40", headers=headers) as response:
                assert response.status == 400, origin
            async with http.get(url + EIO + f"polling&sid={sid}", headers=headers) as response:
                assert response.status == 400, origin


# -- someone else's messages in chatd's Redis channel ---------------------------------------


class Exploit:
    """Unpickled, it would create a file: the proof that a message was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def injected_messages(marker: Path) -> list[bytes]:
    return [
        b"not json at all",
        b"\xff\xfe\x00 not utf-8",
        pickle.dumps(Exploit(marker)),  # what python-socketio < 5.14 would have run
        pickle.dumps({"method": "emit", "event": "new chat", "data": "pickled"}),
        b'"method"',  # a JSON string: python-socketio indexes it and its listener restarts
        b"42",
        b"null",
        b"{}",
        b'{"method": "exec", "code": "import os"}',
        b'{"method": ["emit"]}',
        b"[]",
        b'["chatd"]',
        b'["chatd", "someone", ["unhashable"]]',
        b'["not chatd", "someone", "end_session", "x", "y"]',
        b'["chatd", "someone", "no such control"]',
        b'["chatd", "someone", "end_session"]',  # too few arguments
        b'["chatd", "someone", "chat", 1, 2, 3]',  # too many
        b"[" * 100_000 + b"]" * 100_000,  # deeper than any parser goes
        b'["chatd", "someone", "chat", "' + b"x" * (6 * 1024 * 1024) + b'"]',  # huge
    ]


async def test_messages_written_into_chatds_redis_channel_by_someone_else_are_dropped_and_logged(cluster, tmp_path):
    marker = tmp_path / "executed"
    async with aiohttp.ClientSession() as http:
        cookie = await guest_cookie(http, cluster.a.url)
    on_a = await connect_socket(cluster.a.url, cookie=cookie)
    on_b = await connect_socket(cluster.b.url, cookie=cookie)
    logs_before = [len(process.proc_output) for process in cluster.processes]
    client = redis.asyncio.Redis.from_url(cluster.redis.url)
    try:
        await on_a.next("welcome")
        await on_b.next("welcome")
        messages = injected_messages(marker)
        for message in messages:
            assert await client.publish("chatd", message) >= 2  # both processes hear each
        # What is published after the noise still arrives everywhere, in order.
        for i in range(5):
            ack = await on_a.call("send chat", {"msg": f"after the noise {i}"})
            assert ack["ok"] is True
            for socket in (on_a, on_b):
                while (await socket.next("new chat", timeout=5))["id"] != ack["id"]:
                    pass
    finally:
        await client.aclose()
        await on_a.close()
        await on_b.close()
    assert not marker.exists(), "a pickled message was executed"
    for process, before in zip(cluster.processes, logs_before):
        assert process.proc.poll() is None
        log = process.proc_output[before:]
        assert "Unexpected Error in pubsub" not in log and "Traceback" not in log, log[-3000:]
        dropped = sum(1 for line in log.splitlines() if "dropped" in line or "no handler for control" in line)
        assert dropped == len(messages), log[-3000:]


# -- HTTP heads that once crashed or hung aiohttp ---------------------------------------


HEAD_TIMEOUT = 1.0  # CHATD_HEAD_TIMEOUT for this module's single process (default 20 s)


@pytest.fixture(scope="module")
def chatd(tmp_path_factory):
    process = ChatdProcess("--chat-rate", "0", data_dir=tmp_path_factory.mktemp("attacks-http") / "data",
                           env={"CHATD_HEAD_TIMEOUT": str(HEAD_TIMEOUT)})  # fmt: skip
    process.start()
    yield process
    process.stop()


def chunked_post(trailers: bytes) -> bytes:
    return (
        b"POST /api/logout HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + trailers + b"\r\n"
    )


GET = b"GET /api/session HTTP/1.1\r\nHost: 127.0.0.1\r\n"
HOSTILE_HEADS = {
    "a thousand headers": GET + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"\r\n",
    "a thousand cookies": GET + b"Cookie: a=b\r\n" * 1000 + b"\r\n",
    "a 100 kB header": GET + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    "a 100 kB request line": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "two Hosts": b"GET /api/session HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
    "fifty Hosts": b"GET /api/session HTTP/1.1\r\n" + b"Host: 127.0.0.1\r\n" * 50 + b"\r\n",
    "a thousand trailers": chunked_post(b"".join(b"T%d: v\r\n" % i for i in range(1000))),
    "a 100 kB trailer": chunked_post(b"T: " + b"a" * 100_000 + b"\r\n"),
    "Content-Length and chunked": b"POST /api/logout HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "two Content-Lengths": b"POST /api/logout HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\nContent-Type: application/json\r\n\r\n{}",
    "a folded header": GET + b"X-A: b\r\n  folded\r\n\r\n",
    "a bare LF head": b"GET /api/session HTTP/1.1\nHost: 127.0.0.1\n\n",
    "a NUL in a header": GET + b"X-A: a\x00b\r\n\r\n",
}


async def answer_to(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), timeout)  # the status line
    finally:
        writer.close()


@pytest.mark.parametrize("name", list(HOSTILE_HEADS))
async def test_hostile_request_heads_get_a_4xx_never_a_5xx_or_a_hang(chatd, name):
    status_line = await answer_to(chatd.port, HOSTILE_HEADS[name])
    status = int(status_line.split()[1])
    assert 400 <= status < 500, (name, status_line)
    assert chatd.proc.poll() is None
    async with aiohttp.ClientSession() as http, http.get(chatd.url + "/healthz") as response:
        assert response.status == 200


async def test_a_request_head_sent_a_byte_at_a_time_is_dropped(chatd):
    reader, writer = await asyncio.open_connection("127.0.0.1", chatd.port)
    head = GET + b"X-Slow: " + b"a" * 100
    started = time.monotonic()
    try:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            if reader.at_eof() or time.monotonic() - started > 4 * HEAD_TIMEOUT:
                break
            await asyncio.sleep(0.1)
            await asyncio.sleep(0)  # let the reader see the server's end
        closed_after = time.monotonic() - started
        assert await asyncio.wait_for(reader.read(), 1.0) == b""  # dropped, without an answer
    except ConnectionError:
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after < 3 * HEAD_TIMEOUT, closed_after
    # A whole head sent at once after a pause within the timeout is served.
    assert b" 200 " in await answer_to(chatd.port, GET + b"\r\n")


# -- malformed and oversized packets on both transports, fuzzed ---------------------------------------

PACKET_PREFIXES = ["", "0", "1", "2", "3", "4", "5", "6", "7", "b", "40", "41", "42", "43", "44", "45", "46",
                   "47", "4Z", "451-", "461-", "42/nsp,", "40/nsp,", "421", "43999", "4-1"]  # fmt: skip
EXAMPLES = 300
MAX_FRAME = 64 * 1024  # SPEC: larger Engine.IO frames are refused by the transport


def nested(depth: int) -> str:
    return '42["join",' + "[" * depth + "]" * depth + "]"


frames = st.one_of(
    st.tuples(st.sampled_from(PACKET_PREFIXES), st.text(max_size=300)).map("".join),
    st.tuples(st.sampled_from(PACKET_PREFIXES), st.binary(max_size=300)).map(lambda t: t[0].encode() + t[1]),
    st.integers(10, 200_000).map(nested),
    st.integers(1, 3000).map(lambda n: '42["send chat",{"msg":' + "9" * n + "}]"),
    st.integers(MAX_FRAME - 100, 4 * MAX_FRAME).map(lambda n: '42["send chat",{"msg":"' + "a" * n + '"}]'),
    st.sampled_from(['451-["send chat",{"_placeholder":true,"num":99}]', '42["x",{"_placeholder":true}]',
                     '431["ack for nothing"]', "43abc[1]", '42["connect"]', '42["disconnect"]', "41", "4",
                     '40{"token":' + "[" * 5000 + "}"]),  # fmt: skip
)
attacks = st.tuples(st.sampled_from(["websocket", "polling"]), st.lists(frames, min_size=1, max_size=4))


class Bystanders:
    """A sender and two observers (websocket and polling) chatting while the fuzz runs."""

    def __init__(self, http: aiohttp.ClientSession, url: str, cookie: str) -> None:
        self.sender = RawWebsocketClient(http, url, cookie)
        self.observers = [RawWebsocketClient(http, url, cookie), RawPollingClient(http, url, cookie)]
        self.acked: list[int] = []
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        for client in (self.sender, *self.observers):
            await client.connect()
        self.task = asyncio.ensure_future(self._chat())

    async def _chat(self) -> None:
        i = 0
        while True:
            ack = await self.sender.call("send chat", {"msg": f"bystander {i}"})
            assert ack["ok"], ack
            self.acked.append(ack["id"])
            i += 1
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        deadline = time.monotonic() + 5
        for observer in self.observers:
            while set(self.acked) - {chat["id"] for chat in observer.chats} and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            got = [chat["id"] for chat in observer.chats if chat["msg"].startswith("bystander")]
            assert got[: len(self.acked)] == self.acked, type(observer).__name__
            assert not observer.closed
        for client in (self.sender, *self.observers):
            await client.close()


async def attack(http: aiohttp.ClientSession, url: str, cookie: str, transport: str, payloads: list) -> None:
    """Open a socket of the `/` namespace with the cookie, send `payloads`, go away."""
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}"}
    if transport == "websocket":
        async with http.ws_connect(url + EIO + "websocket", headers=headers, max_msg_size=0) as ws:
            await ws.receive()  # OPEN
            await ws.send_str("40")
            for payload in payloads:
                if ws.closed:
                    break
                try:
                    await (ws.send_str(payload) if isinstance(payload, str) else ws.send_bytes(payload))
                except ConnectionError:
                    break
        return
    status, text = 0, ""
    async with http.get(url + EIO + "polling", headers=headers) as response:
        sid = json.loads((await response.text())[1:])["sid"]
    body: str | bytes
    if all(isinstance(p, str) for p in payloads):
        body = "40" + RECORD_SEPARATOR + RECORD_SEPARATOR.join(payloads)
    else:
        body = b"".join(p if isinstance(p, bytes) else p.encode() for p in payloads)
    async with http.post(url + EIO + f"polling&sid={sid}", data=body, headers=headers) as response:
        status, text = response.status, await response.text()
    assert status < 500, (status, text)
    async with http.post(url + EIO + f"polling&sid={sid}", data="1", headers=headers) as response:
        assert response.status < 500


async def test_malformed_and_oversized_packets_never_crash_the_process_or_disturb_anyone(chatd):
    url = chatd.url
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        bystanders = Bystanders(http, url, await guest_cookie(http, url))
        await bystanders.start()
        attacker = await guest_cookie(http, url)
        ran = {"websocket": 0, "polling": 0}

        @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
        @given(step=attacks)
        def survives(step):
            transport, payloads = step
            ran[transport] += 1
            asyncio.run_coroutine_threadsafe(attack(http, url, attacker, transport, payloads), loop).result(30)
            assert chatd.proc.poll() is None

        await asyncio.to_thread(survives)
        await bystanders.stop()
        assert min(ran.values()) > EXAMPLES / 4, ran
        assert len(bystanders.acked) > 3
        async with http.get(url + "/healthz") as response:
            assert response.status == 200
    assert chatd.proc.poll() is None
