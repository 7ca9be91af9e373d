"""Clients that stop reading are cut off (SPEC "Protecting the server"; issue 24, acceptance 1).

chatd runs as `python -m chatd` (its memory is its own), with SPEC's thresholds:
1 MiB waiting or a frame 30 s old. Twenty sockets that never read join
`general`, 20 MB of chat is sent there, and then: chatd's peak RSS grew by less
than 64 MiB, every slow socket was closed (and counted in /metrics), and an
observer got every message, in order, with no stall. Once per transport: a
websocket that opened as one, a polling session that never asks for its
packets, and a polling session upgraded to a websocket that stops reading.

The non-readers are raw TCP sockets with a tiny receive buffer, so the kernel
holds little for them and what waits, waits in chatd.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import time

import aiohttp
import pytest

from chatd.sessions import COOKIE_NAME

from conftest import ChatdProcess
from engineio_clients import RECORD_SEPARATOR, RawWebsocketClient

SLOW_SOCKETS = 20
MESSAGE_CHARS = 2000  # SPEC's longest message
MESSAGES = 10_000  # 20 MB of chat
IN_FLIGHT = 64  # the sender's unacknowledged messages
RSS_GROWTH_LIMIT = 64 * 1024 * 1024
STALL_SECONDS = 2.0  # the longest the observer may wait between two messages


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def ws_frame(text: str) -> bytes:
    """A masked client text frame (a zero mask: the payload as it is)."""
    payload = text.encode()
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


class NonReader:
    """A raw TCP connection to chatd with a tiny receive buffer, read only until it is in the room."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        self.sock.setblocking(False)
        self.port = port
        self.received = b""

    async def connect(self) -> None:
        await asyncio.get_running_loop().sock_connect(self.sock, ("127.0.0.1", self.port))

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def read_until(self, marker: bytes, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while marker not in self.received:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), max(0.01, deadline - loop.time()))
            assert chunk, f"closed before {marker!r}: {self.received[-200:]!r}"
            self.received += chunk
        self.received = self.received[self.received.index(marker) + len(marker) :]

    async def upgrade(self, cookie: str, query: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        await self.send(
            (
                f"GET /socket.io/?EIO=4&transport=websocket{query} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nCookie: {COOKIE_NAME}={cookie}\r\n\r\n"
            ).encode()
        )
        await self.read_until(b"\r\n\r\n")

    async def closed_by_server(self, timeout: float = 10.0) -> bool:
        """Read (at last) until the server's end: True when the connection ends (EOF or reset) in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                if not await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), deadline - loop.time()):
                    return True
        except (ConnectionError, OSError):
            return True
        except asyncio.TimeoutError:
            pass
        return False

    def close(self) -> None:
        self.sock.close()


async def websocket_reader(http: aiohttp.ClientSession, url: str, cookie: str, port: int):
    """A websocket that opens as one, joins, then never reads again."""
    reader = NonReader(port)
    await reader.connect()
    await reader.upgrade(cookie, "")
    await reader.send(ws_frame("40"))
    await reader.read_until(b'40{"sid"')
    return reader, None


async def polling_session(http: aiohttp.ClientSession, url: str, cookie: str) -> str:
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}"}
    async with http.get(url + "/socket.io/?EIO=4&transport=polling", headers=headers) as response:
        sid = json.loads((await response.text())[1:])["sid"]
    query = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
    async with http.post(url + query, data="40", headers=headers) as response:
        assert response.status == 200
    packets: list[str] = []
    while not any(packet.startswith("40{") for packet in packets):  # welcome, then the CONNECT answer
        async with http.get(url + query, headers=headers) as response:
            assert response.status == 200
            packets = (await response.text()).split(RECORD_SEPARATOR)
    return sid


async def polling_reader(http: aiohttp.ClientSession, url: str, cookie: str, port: int):
    """A polling session that connects, joins, and then never asks for its packets."""
    return None, await polling_session(http, url, cookie)


async def upgraded_reader(http: aiohttp.ClientSession, url: str, cookie: str, port: int):
    """A polling session upgraded to a websocket, which then stops reading."""
    sid = await polling_session(http, url, cookie)
    reader = NonReader(port)
    await reader.connect()
    await reader.upgrade(cookie, f"&sid={sid}")
    await reader.send(ws_frame("2probe"))
    await reader.read_until(b"3probe")
    await reader.send(ws_frame("5"))
    return reader, sid


@pytest.fixture(scope="module")
def chatd(tmp_path_factory):
    process = ChatdProcess("--chat-rate", "0", "--metrics", "--log-level", "warning",
                           data_dir=tmp_path_factory.mktemp("slow") / "data")  # fmt: skip
    process.start()
    yield process
    process.stop()


@pytest.mark.parametrize("make_reader", [websocket_reader, polling_reader, upgraded_reader])
async def test_twenty_sockets_that_stop_reading_are_cut_off_and_nobody_waits_for_them(chatd, make_reader):
    url, port, pid = chatd.url, chatd.port, chatd.proc.pid
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(url + "/api/session") as response:
            cookie = response.cookies[COOKIE_NAME].value
        async with http.get(url + "/metrics") as response:
            closed_before = metric(await response.text(), "chatd_connections_closed_slow_total")
        observer = RawWebsocketClient(http, url, cookie)
        sender = RawWebsocketClient(http, url, cookie)
        await observer.connect()
        await sender.connect()
        # Warm up: the first messages cost what any chatd costs (caches, buffers), not the slow readers.
        for i in range(50):
            await sender.call("send chat", {"msg": f"warm {i}"})
        while len(observer.chats) < 50:
            await asyncio.wait_for(observer.chat_arrived.wait(), 5)
            observer.chat_arrived.clear()
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # the peak RSS (VmHWM) starts again from now
        rss_before = status_kib(pid, "VmHWM") * 1024

        slow = [await make_reader(http, url, cookie, port) for _ in range(SLOW_SOCKETS)]
        arrivals: list[float] = []
        observer.chats.clear()

        async def watch() -> None:
            while len(observer.chats) < MESSAGES:
                observer.chat_arrived.clear()
                await observer.chat_arrived.wait()
                arrivals.extend([time.monotonic()] * (len(observer.chats) - len(arrivals)))

        watching = asyncio.ensure_future(watch())
        text = "x" * (MESSAGE_CHARS - 6)
        in_flight = asyncio.Semaphore(IN_FLIGHT)

        async def send(i: int) -> None:
            async with in_flight:
                ack = await sender.call("send chat", {"msg": f"{i:06d}{text}"})
                assert ack["ok"], ack

        started = time.monotonic()
        await asyncio.gather(*(send(i) for i in range(MESSAGES)))
        await asyncio.wait_for(watching, 30)
        elapsed = time.monotonic() - started
        peak = status_kib(pid, "VmHWM") * 1024
        print(f"{make_reader.__name__}: {elapsed:.1f} s, peak RSS +{(peak - rss_before) / 2**20:.1f} MiB")

        # The observer got every message, in order, and never waited long for the next.
        assert [chat["msg"][:6] for chat in observer.chats] == [f"{i:06d}" for i in range(MESSAGES)]
        gaps = [b - a for a, b in zip([started, *arrivals], arrivals)]
        assert max(gaps) < STALL_SECONDS, (max(gaps), elapsed)
        # chatd's memory did not hold 20 copies of 20 MB.
        assert peak - rss_before < RSS_GROWTH_LIMIT, (peak - rss_before) / 2**20
        # Every slow socket was closed, and counted.
        async with http.get(url + "/metrics") as response:
            closed = metric(await response.text(), "chatd_connections_closed_slow_total") - closed_before
        assert closed == SLOW_SOCKETS
        for reader, sid in slow:
            if reader is not None:
                assert await reader.closed_by_server(), "a non-reading socket was left open"
                reader.close()
            if sid is not None:  # the polling session is gone: its next poll is refused
                query = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
                async with http.get(url + query, headers={"Cookie": f"{COOKIE_NAME}={cookie}"}) as response:
                    assert response.status == 400
        await observer.close()
        await sender.close()


async def test_a_frame_that_waits_too_long_closes_its_connection_even_under_the_byte_limit(make_config):
    """The age limit (30 s by default; 0.5 s here) on a websocket and a polling session that stop reading."""
    from aiohttp import web

    from chatd.sio.engine import DirectWebSocket
    from chatd.web import REALTIME, create_app

    app = create_app(make_config(chat_rate=0))
    engine = app[REALTIME].sio.eio
    engine.max_backlog_seconds = 0.5
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(url + "/api/session") as response:
                cookie = response.cookies[COOKIE_NAME].value
            sender = RawWebsocketClient(http, url, cookie)
            await sender.connect()
            reader, _ = await websocket_reader(http, url, cookie, port)
            # Until some waits in chatd for the websocket too (past the kernel's buffers), far under 1 MiB.
            for i in range(3000):
                assert (await sender.call("send chat", {"msg": f"{i}" + "y" * 1990}))["ok"]
                if any(isinstance(waiter, DirectWebSocket) for waiter in engine.watched):
                    break
            _, sid = await polling_reader(http, url, cookie, port)
            assert (await sender.call("send chat", {"msg": "and one for the polling session"}))["ok"]
            assert sum(waiter.backlog() for waiter in engine.watched) < 1 << 20
            assert engine.cut_off_count == 0
            await asyncio.sleep(1.6)  # the age limit, then the next sweep (every age limit / 4)
            assert engine.cut_off_count == 2
            assert await reader.closed_by_server(timeout=1.0)
            reader.close()
            async with http.get(url + f"/socket.io/?EIO=4&transport=polling&sid={sid}") as response:
                assert response.status == 400
            await sender.close()
    finally:
        await runner.cleanup()
