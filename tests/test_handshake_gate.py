"""The handshake gate (chatd/handshake_gate.py): refusals answered before aiohttp are
the refusals aiohttp gives, and everything else reaches aiohttp untouched.

`start_chatd` serves through the gate, as `python -m chatd` does; `aiohttp_server`
serves the same app through aiohttp alone. Bytes here are written by hand over
plain TCP, to control how they arrive."""

from __future__ import annotations

import asyncio
import json
import os
import time
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from cryptography.fernet import Fernet

from chatd.__main__ import make_runner
from chatd.sessions import COOKIE_NAME
from chatd.web import create_app
from conftest import EVENT_TIMEOUT, Visitor

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def handshake(cookie: str | None = None, *, query: str = "EIO=4&transport=websocket", extra: str = "") -> bytes:
    head = (
        f"GET /socket.io/?{query} HTTP/1.1\r\nHost: chatd.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}"
    )
    if cookie is not None:
        head += f"Cookie: {COOKIE_NAME}={cookie}\r\n"
    return (head + "\r\n").encode()


def client_frame(payload: bytes, opcode: int = 1, *, masked: bool = True, length: int | None = None) -> bytes:
    mask = os.urandom(4) if masked else b""
    n = len(payload) if length is None else length
    header = bytes([0x80 | opcode, (0x80 if masked else 0) | (n if n < 126 else 126 if n < 65536 else 127)])
    if n >= 126:
        header += n.to_bytes(2 if n < 65536 else 8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if masked else payload
    return header + mask + body


class Raw:
    """One TCP connection to chatd, spoken to byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base_url: str) -> Raw:
        url = urlsplit(base_url)
        return cls(*await asyncio.open_connection(url.hostname, url.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response_head(self) -> tuple[str, dict[str, str]]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), EVENT_TIMEOUT)
        status, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        return status, {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from chatd: (opcode, payload); (-1, b"") once the connection ended."""
        try:
            first, second = await asyncio.wait_for(self.reader.readexactly(2), EVENT_TIMEOUT)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            return first & 0x0F, await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return -1, b""

    async def ended(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), EVENT_TIMEOUT) is not None
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()


async def refused_websocket(
    base_url: str, cookie: str | None, extra: str = ""
) -> tuple[str, dict[str, str], dict, str, Raw]:
    """Status line, headers, Engine.IO OPEN and the answer to CONNECT; and the connection."""
    raw = await Raw.open(base_url)
    await raw.send(handshake(cookie, extra=extra))
    status, headers = await raw.response_head()
    opcode, opening = await raw.frame()
    assert opcode == 1 and opening.startswith(b"0{")
    await raw.send(client_frame(b"40"))
    opcode, answer = await raw.frame()
    assert opcode == 1
    return status, headers, json.loads(opening[1:]), answer.decode(), raw


def expired_cookie(secret_key: str) -> str:
    session = {"sid": "s" * 32, "name": "guest-0001", "account": None, "exp": int(time.time()) - 60, "mid": "m" * 16}
    return Fernet(secret_key).encrypt(json.dumps({"created": int(time.time()), "session": session}).encode()).decode()


@pytest.fixture
async def both(start_chatd, aiohttp_server, make_config, tmp_path) -> tuple[str, str]:
    """The same chatd (same secret key) served through the gate and through aiohttp alone."""
    gated = await start_chatd()
    plain = await aiohttp_server(create_app(make_config(data_dir=tmp_path / "plain")))
    return gated, str(plain.make_url("/")).rstrip("/")


@pytest.mark.parametrize("kind", ["none", "tampered", "expired", "unquoted", "browser"])
async def test_a_refusal_at_the_gate_is_the_refusal_through_aiohttp(both, secret_key, kind):
    gated, plain = both
    visitor = Visitor(plain)
    await visitor.session()
    good = visitor.cookie
    await visitor.close()
    assert good
    cookie = {
        "none": None,
        "tampered": good[:40] + ("A" if good[40] != "A" else "B") + good[41:],
        "expired": expired_cookie(secret_key),
        "unquoted": good.strip('"')[:-3] + "xyz",
        "browser": None,  # with the Origin a browser sends: chatd's own
    }[kind]
    origin = "Origin: http://chatd.test\r\n" if kind == "browser" else ""
    seen, servers = [], []
    for base_url in (gated, plain):
        status, headers, opening, answer, raw = await refused_websocket(base_url, cookie, extra=origin)
        seen.append((status, {k: v for k, v in headers.items() if k not in ("date", "server")}, set(opening), answer))
        servers.append(headers.get("server"))
        await raw.close()
    assert seen[0] == seen[1]
    # Only aiohttp names itself: proof that the gate, not aiohttp, answered the first
    # (were aiohttp's sites to stop taking AppRunner.server as their protocol factory).
    assert servers[0] is None and servers[1] and "aiohttp" in servers[1]
    status, headers, opening_keys, answer = seen[0]
    assert status == "HTTP/1.1 101 Switching Protocols" and headers["sec-websocket-accept"] == ACCEPT
    assert "content-security-policy" in headers  # names are lower-cased by Raw.response_head
    reason = {"none": "no_session", "browser": "no_session", "expired": "expired"}.get(kind, "invalid_session")
    assert json.loads(answer[2:]) == {"message": "unauthorized", "data": {"reason": reason}}


async def test_the_gate_lets_allowed_origins_in_and_leaves_the_rest_to_aiohttp(start_chatd):
    base_url = await start_chatd(allow_origins=("https://app.example",))
    answered_by = {}
    for origin in ("http://chatd.test", "https://app.example", "https://evil.example", "http://chatd.test:1"):
        raw = await Raw.open(base_url)
        await raw.send(handshake(extra=f"Origin: {origin}\r\n"))
        status, headers = await raw.response_head()
        answered_by[origin] = (status.split(" ")[1], "aiohttp" if "server" in headers else "gate")
        await raw.close()
    assert answered_by == {
        "http://chatd.test": ("101", "gate"),
        "https://app.example": ("101", "gate"),
        "https://evil.example": ("400", "aiohttp"),  # Engine.IO's origin check, counted there
        "http://chatd.test:1": ("400", "aiohttp"),
    }


@pytest.mark.parametrize(
    "cookie_header",
    [
        'other="a;chatd_session=gAAAAABforged;b"',  # inside another cookie's quoted value: no chatd cookie
        "chatd_session=gAAAAABforged; chatd_session=gAAAAABother",  # twice
        'chatd_session="gAAAAABforged',  # a quote left open
    ],
)
async def test_cookie_syntax_the_gate_might_read_otherwise_is_left_to_aiohttp(base_url, cookie_header):
    raw = await Raw.open(base_url)
    await raw.send(handshake(extra=f"Cookie: {cookie_header}\r\n"))
    status, headers = await raw.response_head()
    assert status.startswith("HTTP/1.1 101") and "aiohttp" in headers["server"]
    await raw.close()


async def test_a_head_in_pieces_is_still_refused_and_other_requests_still_reach_aiohttp(base_url):
    raw = await Raw.open(base_url)
    for i in range(0, len(data := handshake()), 7):
        await raw.send(data[i : i + 7])
        await asyncio.sleep(0.005)
    status, _ = await raw.response_head()
    assert status.startswith("HTTP/1.1 101")
    await raw.close()

    raw = await Raw.open(base_url)
    for piece in (b"GE", b"T /heal", b"thz HTTP/1.1\r\nHost: x\r\n", b"\r\n"):
        await raw.send(piece)
        await asyncio.sleep(0.01)
    status, _ = await raw.response_head()
    assert status.startswith("HTTP/1.1 200")
    await raw.close()


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (handshake(query="EIO=3&transport=websocket"), "HTTP/1.1 400"),  # engine.io: unsupported version
        (handshake(extra="Origin: https://elsewhere.example\r\n"), "HTTP/1.1 400"),  # the origin check
        (handshake(extra="Sec-WebSocket-Version: 13\r\n"), "HTTP/1.1 101"),  # a header twice: aiohttp's call
        (handshake().replace(b"HTTP/1.1", b"HTTP/1.0", 1), "HTTP/1.0 101"),  # aiohttp upgrades 1.0 too
        (handshake(extra="X-Odd\x01: 1\r\n"), "HTTP/1.0 400"),  # not a header name
        (handshake(extra="X-Odd: a\x7fb\r\n"), "HTTP/1.0 400"),  # a control character in a value
        (b"POST /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 400"),
    ],
)
async def test_anything_unusual_is_left_to_aiohttp(both, request_bytes, status):
    gated, plain = both
    answers = []
    for base_url in (gated, plain):
        raw = await Raw.open(base_url)
        await raw.send(request_bytes)
        answers.append((await raw.response_head())[0])
        await raw.close()
    assert answers[0] == answers[1]
    assert answers[0].startswith(status)


async def test_a_head_with_frames_behind_it_goes_to_aiohttp_and_is_refused_the_same(base_url):
    raw = await Raw.open(base_url)
    await raw.send(handshake() + client_frame(b"40"))  # no waiting for the 101
    status, _ = await raw.response_head()
    assert status.startswith("HTTP/1.1 101")
    assert (await raw.frame())[1].startswith(b"0{")
    opcode, answer = await raw.frame()
    assert opcode == 1 and json.loads(answer[2:])["data"] == {"reason": "no_session"}
    await raw.close()


@pytest.mark.parametrize(
    "frame, expected",
    [
        (client_frame(b"40", masked=False), (8, (1002).to_bytes(2, "big"))),  # clients must mask
        (client_frame(b"", length=70_000), (8, (1009).to_bytes(2, "big"))),  # over the frame limit
        (client_frame(b"\x00\x01", opcode=2), (8, (1000).to_bytes(2, "big"))),  # binary: the end
        (client_frame(b"1"), (8, (1000).to_bytes(2, "big"))),  # Engine.IO CLOSE
        (client_frame(b"\xff\xfe"), (8, (1007).to_bytes(2, "big"))),  # not UTF-8
        (client_frame(b"ping!", opcode=9), (10, b"ping!")),  # a ping gets its pong
        (client_frame(b'40/admin,{"x":1}'), (1, b'44/admin,"Unable to connect"')),
    ],
    # Named, not shown: the frames carry random masks, and pytest-xdist's workers must collect the same ids.
    ids=["unmasked", "over-the-limit", "binary", "close", "not-utf8", "ping", "other-namespace"],
)
async def test_a_refused_websocket_answers_odd_frames_and_nobody_else_notices(base_url, frame, expected):
    raw = await Raw.open(base_url)
    await raw.send(handshake())
    await raw.response_head()
    await raw.frame()  # OPEN
    await raw.send(frame)
    assert await raw.frame() == expected
    if expected[0] == 8:
        assert await raw.ended()
    await raw.close()
    visitor = Visitor(base_url)
    assert (await visitor.session())["name"].startswith("guest-")
    await visitor.close()


async def test_shutting_down_ends_refused_websockets_still_open(make_config):
    runner = make_runner(create_app(make_config()))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    raw = await Raw.open(f"http://127.0.0.1:{runner.addresses[0][1]}")
    await raw.send(handshake())
    assert (await raw.response_head())[0].startswith("HTTP/1.1 101")
    await raw.frame()  # OPEN; no CONNECT: the client just stays
    started = time.monotonic()
    await runner.cleanup()
    assert await raw.frame() == (8, (1000).to_bytes(2, "big"))
    assert await raw.ended()
    assert time.monotonic() - started < 3
    await raw.close()
