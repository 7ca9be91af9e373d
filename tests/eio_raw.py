"""Engine.IO v4 spoken by hand, one packet at a time, for protocol conformance tests.

`RawConnection.open(http, url, transport)` opens a session on one transport:
"websocket", "polling", or "upgraded" (polling first, then the websocket probe and
UPGRADE, as socket.io-client does). `send` sends one Engine.IO packet (text),
`recv` returns the next one that is not a PING (PINGs are answered with PONG),
and `ended` tells whether the server closed the session. Nothing is retried or
tolerated: what the server sends is what the test sees.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp

RECORD_SEPARATOR = "\x1e"
TIMEOUT = 3.0


class RawConnection:
    def __init__(self, http: aiohttp.ClientSession, url: str, transport: str, headers: dict | None = None) -> None:
        self.http = http
        self.url = url  # e.g. http://127.0.0.1:8080/socket.io/
        self.transport = transport
        self.headers = headers or {}
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.sid = ""
        self.handshake: dict = {}
        self.buffer: list[str | bytes] = []
        self.answer_pings = True
        self.closed = False  # the server ended the session

    @classmethod
    async def open(cls, http, url: str, transport: str, headers: dict | None = None) -> RawConnection:
        conn = cls(http, url, transport, headers)
        if transport == "websocket":
            conn.ws = await http.ws_connect(conn.query(transport="websocket"), headers=conn.headers)
            first = await conn._ws_packet(TIMEOUT)
        else:
            status, first = await conn.get(conn.query(transport="polling"))
            assert status == 200, (status, first)
        assert isinstance(first, str) and first.startswith("0{"), first
        conn.handshake = json.loads(first[1:])
        conn.sid = conn.handshake["sid"]
        if transport == "upgraded":
            await conn.upgrade()
        return conn

    def query(self, **params) -> str:
        return self.url + "?" + "&".join(f"{k}={v}" for k, v in {"EIO": "4", **params}.items())

    @property
    def poll_url(self) -> str:
        return self.query(transport="polling", sid=self.sid)

    async def get(self, url: str | None = None, timeout: float = TIMEOUT) -> tuple[int, str]:
        async with self.http.get(url or self.poll_url, headers=self.headers, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.text()

    async def post(self, body: str | bytes) -> tuple[int, str]:
        async with self.http.post(self.poll_url, data=body, headers=self.headers) as r:
            return r.status, await r.text()

    async def upgrade(self) -> None:
        """The websocket probe, the NOOP that ends the pending poll, then UPGRADE."""
        poll = asyncio.ensure_future(self.get())
        await asyncio.sleep(0.05)  # the long-poll is pending, as a client's is
        self.ws = await self.http.ws_connect(self.query(transport="websocket", sid=self.sid), headers=self.headers)
        await self.ws.send_str("2probe")
        assert await self._ws_packet(TIMEOUT) == "3probe"
        status, text = await poll
        assert status == 200, (status, text)
        self.buffer.extend(p for p in text.split(RECORD_SEPARATOR) if p != "6")  # what was queued, then NOOP
        await self.ws.send_str("5")

    @property
    def on_websocket(self) -> bool:
        return self.ws is not None

    async def send(self, packet: str | bytes) -> int:
        """Send one packet; the POST's status on polling (200 on a websocket)."""
        if self.on_websocket:
            if isinstance(packet, bytes):
                await self.ws.send_bytes(packet)
            else:
                await self.ws.send_str(packet)
            return 200
        status, _ = await self.post(packet if isinstance(packet, str) else "b" + base64.b64encode(packet).decode())
        return status

    async def _ws_packet(self, timeout: float) -> str | bytes | None:
        frame = await asyncio.wait_for(self.ws.receive(), timeout)
        if frame.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return frame.data
        self.closed = True
        return None

    async def _fill(self, timeout: float) -> None:
        if self.on_websocket:
            packet = await self._ws_packet(timeout)
            if packet is not None:
                self.buffer.append(packet)
            return
        status, text = await self.get(timeout=timeout)
        if status != 200:
            self.closed = True
            return
        self.buffer.extend(text.split(RECORD_SEPARATOR))

    async def recv(self, timeout: float = TIMEOUT) -> str | bytes | None:
        """The next packet that is not a PING; None once the server has closed the session
        (its CLOSE packet, a closed websocket, or a poll answered 400)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.buffer:
                packet = self.buffer.pop(0)
                if packet == "2" and self.answer_pings:
                    await self.send("3")
                    continue
                if packet == "1":
                    self.closed = True
                    return None
                return packet
            if self.closed:
                return None
            await self._fill(max(0.01, deadline - time.monotonic()))

    async def ended(self, within: float = 1.0) -> bool:
        """Whether the server closes the session within `within` seconds, reading (and
        dropping) what it sends meanwhile."""
        deadline = time.monotonic() + within
        try:
            while await self.recv(max(0.01, deadline - time.monotonic())) is not None:
                pass
            if self.on_websocket:  # after its CLOSE packet, the websocket itself must close
                while await self._ws_packet(max(0.01, deadline - time.monotonic())) is not None:
                    pass
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
