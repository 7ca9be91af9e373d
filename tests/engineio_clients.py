"""Cheap Socket.IO clients spoken by hand over Engine.IO v4, for tests with hundreds of sockets.

python-socketio's AsyncClient costs a background task set and an Engine.IO
client per socket; these cost one reader task each. They speak just what the
chat needs: open the `/` namespace with a cookie, answer pings, send events
with acks, and record every `welcome`, `new chat` and ack as it arrives, in
order. `RawWebsocketClient` and `RawPollingClient` share all of that but the
transport.

`query` is added to every request's URL, e.g. {"client": "17"} for an nginx that
balances on `hash $arg_client` (see nginx_service.server_block).
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode

import aiohttp

from chatd.sessions import COOKIE_NAME

RECORD_SEPARATOR = "\x1e"  # between Engine.IO packets in one polling payload


class RawClient:
    def __init__(self, http: aiohttp.ClientSession, base_url: str, cookie: str, query: dict | None = None) -> None:
        self.http = http
        self.base_url = base_url
        self.headers = {"Cookie": f"{COOKIE_NAME}={cookie}"}
        self.query = dict(query or {})
        self.welcome: dict | None = None
        self.chats: list[dict] = []  # every `new chat`, in arrival order
        self.changes: list[tuple[str, dict]] = []  # every `new chat`, `chat edited`, `chat deleted`, in order
        self.chat_arrived = asyncio.Event()
        self.change_arrived = asyncio.Event()
        self.acks: dict[int, asyncio.Future] = {}
        self.next_ack = 0
        self.connected = asyncio.Event()
        self.closed = False
        self.reader: asyncio.Task | None = None

    def url(self, **params) -> str:
        return f"{self.base_url}/socket.io/?" + urlencode({"EIO": "4", **params, **self.query})

    # -- the transport's part --------------------------------------------------------

    async def open(self) -> None:
        raise NotImplementedError

    async def send_packet(self, text: str) -> None:
        raise NotImplementedError

    async def receive_packets(self) -> list[str]:
        """The next packets from the server; [] when the connection is closed."""
        raise NotImplementedError

    # -- Socket.IO -------------------------------------------------------------------

    async def connect(self, timeout: float = 30.0) -> None:
        await self.open()
        self.reader = asyncio.ensure_future(self._read())
        await self.send_packet("40")
        await asyncio.wait_for(self.connected.wait(), timeout)

    async def call(self, event: str, payload, timeout: float = 30.0):
        """Emit with an ack; the ack's first argument."""
        number = self.next_ack
        self.next_ack += 1
        future = self.acks[number] = asyncio.get_running_loop().create_future()
        await self.send_packet(f"42{number}" + json.dumps([event, payload], separators=(",", ":")))
        return await asyncio.wait_for(future, timeout)

    async def _read(self) -> None:
        while packets := await self.receive_packets():
            for packet in packets:
                await self._handle(packet)
        self.closed = True

    async def _handle(self, packet: str) -> None:
        if packet == "2":  # ping
            await self.send_packet("3")
        elif packet.startswith("40"):
            self.connected.set()
        elif packet.startswith("42["):
            event, data = json.loads(packet[2:])
            if event in ("new chat", "chat edited", "chat deleted"):
                self.changes.append((event, data))
                self.change_arrived.set()
            if event == "new chat":
                self.chats.append(data)
                self.chat_arrived.set()
            elif event == "welcome":
                self.welcome = data
        elif packet.startswith("43"):
            body = packet[2:]
            split = body.index("[")
            future = self.acks.pop(int(body[:split]), None)
            if future is not None and not future.done():
                future.set_result(json.loads(body[split:])[0])

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


class RawWebsocketClient(RawClient):
    ws: aiohttp.ClientWebSocketResponse

    async def open(self) -> None:
        self.ws = await self.http.ws_connect(self.url(transport="websocket"), headers=self.headers)
        frame = await self.ws.receive()
        assert frame.type == aiohttp.WSMsgType.TEXT and frame.data.startswith("0{"), frame

    async def send_packet(self, text: str) -> None:
        await self.ws.send_str(text)

    async def receive_packets(self) -> list[str]:
        frame = await self.ws.receive()
        return [frame.data] if frame.type == aiohttp.WSMsgType.TEXT else []

    async def close(self) -> None:
        await super().close()
        await self.ws.close()


class RawPollingClient(RawClient):
    sid: str

    async def open(self) -> None:
        async with self.http.get(self.url(transport="polling"), headers=self.headers) as response:
            text = await response.text()
            assert response.status == 200 and text.startswith("0{"), (response.status, text)
        self.sid = json.loads(text[1:])["sid"]

    async def send_packet(self, text: str) -> None:
        async with self.http.post(self.url(transport="polling", sid=self.sid), data=text, headers=self.headers) as r:
            assert r.status == 200, (r.status, await r.text())

    async def receive_packets(self) -> list[str]:
        async with self.http.get(self.url(transport="polling", sid=self.sid), headers=self.headers) as response:
            if response.status != 200:
                return []
            text = await response.text()
        packets = text.split(RECORD_SEPARATOR)
        return [] if "1" in packets else packets  # "1": the server closed this session

    async def close(self) -> None:
        await super().close()
        try:
            await self.send_packet("1")
        except (AssertionError, aiohttp.ClientError):
            pass


TRANSPORTS = {"websocket": RawWebsocketClient, "polling": RawPollingClient}
