"""The first bytes of every connection: websocket handshakes that will be refused are
answered here, before aiohttp sees them.

A Socket.IO handshake with no session cookie, or one that does not open (forged,
tampered, expired), can only end in SPEC's `connect_error` `unauthorized`. Through
aiohttp, that answer cost a request object, the middlewares, a handler task and a
`WebSocketResponse`: about 0.25 ms of CPU each, slower than the Node stack of the
seeds (bench/run.py, `refuse-*`). The gate reads the request head itself and, when
it is plainly such a handshake, answers the same bytes a refusal through aiohttp
would (the 101 with chatd's security headers, Engine.IO's OPEN, the CONNECT_ERROR
once the client sends CONNECT) from protocol callbacks, with no task.

The gate applies the same origin rule as Engine.IO's check (no Origin, chatd's own
origin, or one of --allow-origin). Everything else — every other request, a
handshake with a cookie that opens (even a revoked one: that needs storage), an
origin the rule refuses (aiohttp answers and counts it), anything unusual in the
head (a body, repeated headers, HTTP/1.0, a query beyond `EIO=4&transport=websocket`)
— goes to aiohttp unchanged: the gate hands the connection and the bytes it holds
to aiohttp's own protocol and steps out of the way. Behind --trusted-proxy, or with
access logging on (--log-level debug), the gate is not installed at all: those
need aiohttp's view of every request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from typing import Callable

from aiohttp import web
from aiohttp.http import WS_KEY

from .broadcast import CLOSE, EngineServer, frame_header, refusal_answer, websocket_frame
from .config import origin_allowed
from .sessions import COOKIE_NAME, NO_SESSION, SessionCookieStorage

_PREFIX = b"GET /socket.io/?"
_MAX_HEAD = 8190  # aiohttp's own limit for a request line or header
# A Fernet token (base64url), bare or in the quotes the cookie goes out in (it has "=").
_TOKEN = re.compile(r'"?([A-Za-z0-9_=-]+)"?')
_QUERY = ["EIO=4", "transport=websocket"]
_CACHE_BUSTER = re.compile(r"t=[A-Za-z0-9._~-]*")
# A header line as RFC 9110 spells it (a token, a colon, visible characters, spaces and
# tabs); anything else (obs-fold, control characters) aiohttp answers with its 400.
_HEADER_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([\t\x20-\x7e]*)")
# Headers the gate reads or that make a request one it leaves to aiohttp; any of them
# twice and aiohttp decides.
_WATCHED = {
    "host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version", "cookie", "origin",
    "content-length", "transfer-encoding", "sec-websocket-extensions",
}  # fmt: skip

# Close codes (RFC 6455 section 7.4.1).
_NORMAL, _PROTOCOL_ERROR, _NOT_TEXT, _TOO_BIG = 1000, 1002, 1007, 1009
_OP_CONTINUATION, _OP_TEXT, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 8, 9, 10


class HandshakeGate:
    """Decides from a request head whether to refuse it here, and keeps the connections it refused."""

    def __init__(
        self,
        sessions: SessionCookieStorage,
        engine: EngineServer,
        refusal: Callable[[str], str],
        headers: dict[str, str],
        allow_origins: tuple[str, ...] = (),
    ) -> None:
        self._sessions = sessions
        self._allow_origins = allow_origins
        self._engine = engine
        self._refusal = refusal  # reason -> the CONNECT_ERROR packet, counted as refused
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._response_tail = ("\r\n" + extra + "\r\n").encode("latin-1")
        self.open: set[RefusedWebSocket] = set()

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """What a site's `create_server` gets in place of aiohttp's `server`."""
        return lambda: GateProtocol(self, server)

    def close_all(self) -> None:
        for refused in list(self.open):
            refused.close(_NORMAL)

    def answer(self, head: bytes) -> tuple[bytes, str] | None:
        """For a handshake to refuse here: the 101 response with Engine.IO's OPEN, and
        the CONNECT_ERROR for the client's CONNECT. None: aiohttp decides."""
        headers = _plain_websocket_handshake(head)
        if headers is None:
            return None
        # As web.origin_allowed: without a trusted proxy (the gate's only case) the scheme
        # is plain http, chatd not terminating TLS, and the host is Host.
        if not origin_allowed(headers.get("origin"), "http://" + headers["host"], self._allow_origins):
            return None  # aiohttp refuses it and counts it as forbidden_origin
        cookie = headers.get("cookie")
        if cookie is None or COOKIE_NAME not in cookie:
            reason = NO_SESSION
        else:
            values = [value for name, _, value in (p.strip().partition("=") for p in cookie.split(";"))
                      if name == COOKIE_NAME]  # fmt: skip
            # One chatd cookie, bare or quoted, and no quotes elsewhere (a quoted value
            # can hide a ";"): any other syntax aiohttp's parser may read differently.
            token = _TOKEN.fullmatch(values[0]) if len(values) == 1 else None
            if token is None or values[0].count('"') not in (0, 2) or cookie.count('"') != values[0].count('"'):
                return None
            opened = self._sessions.open_cookie(token.group(1))
            if not isinstance(opened, str):
                return None  # a session: connect (or refuse as revoked) through aiohttp
            reason = opened
        accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + WS_KEY).digest())
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: "
            + accept
            + self._response_tail
            + websocket_frame(self._engine.open_packet())
        )
        return response, self._refusal(reason)

    @property
    def timeout(self) -> float:
        return self._engine.refusal_timeout

    @property
    def frame_limit(self) -> int:
        return self._engine.max_http_buffer_size


class GatedAppRunner(web.AppRunner):
    """aiohttp's AppRunner whose sites hand each new connection to `gate` first."""

    def __init__(self, app: web.Application, gate: HandshakeGate, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self.gate = gate

    @property
    def server(self):  # what every site passes to create_server as its protocol factory
        server = super().server
        return None if server is None else self.gate.protocol_factory(server)


def _plain_websocket_handshake(head: bytes) -> dict[str, str] | None:
    """The head's headers (lower-case names) if it is a plain Engine.IO websocket
    handshake (see the module's docstring), else None."""
    try:
        lines = head.decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        return None
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.partition(" ")
    if method != "GET" or version != "HTTP/1.1":
        return None
    path, _, query = target.partition("?")
    if path != "/socket.io/":
        return None
    params = query.split("&")
    if sorted(p for p in params if not _CACHE_BUSTER.fullmatch(p)) != _QUERY or len(params) > 3:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            return None
        name = header.group(1).lower()
        if name in _WATCHED and name in headers:
            return None
        headers[name] = header.group(2).strip(" \t")
    if "host" not in headers or "transfer-encoding" in headers:
        return None
    if headers.get("content-length", "0") != "0":
        return None
    if headers.get("upgrade", "").lower() != "websocket" or headers.get("sec-websocket-version") != "13":
        return None
    if "upgrade" not in (token.strip().lower() for token in headers.get("connection", "").split(",")):
        return None
    try:
        if len(base64.b64decode(headers.get("sec-websocket-key", ""), validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    return headers


class GateProtocol(asyncio.Protocol):
    """A new connection: held until its request head shows whether the gate answers it."""

    def __init__(self, gate: HandshakeGate, server: web.Server) -> None:
        self._gate = gate
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._held = b""
        self._refused: RefusedWebSocket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            self._refused.data_received(data)
            return
        held = self._held + data
        if not held.startswith(_PREFIX[: len(held)]) or len(held) > _MAX_HEAD:
            return self._hand_over(held)
        end = held.find(b"\r\n\r\n")
        if end < 0:
            self._held = held
            return
        answer = None if end + 4 != len(held) else self._gate.answer(held[:end])
        if answer is None:  # not ours, or bytes after the head that aiohttp must see
            return self._hand_over(held)
        response, refusal = answer
        assert self._transport is not None
        self._refused = RefusedWebSocket(self._gate, self._transport, refusal)
        self._transport.write(response)

    def _hand_over(self, held: bytes) -> None:
        """Give the connection to aiohttp as if it had been aiohttp's from the start."""
        assert self._transport is not None
        handler = self._server()
        self._transport.set_protocol(handler)
        handler.connection_made(self._transport)
        handler.data_received(held)

    def eof_received(self) -> bool | None:
        return None  # half a request head, or a refused client gone: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused is not None:
            self._refused.lost()


class RefusedWebSocket:
    """A websocket that only answers the client's CONNECT with the refusal, then ends."""

    def __init__(self, gate: HandshakeGate, transport: asyncio.Transport, refusal: str) -> None:
        self._gate = gate
        self._transport = transport
        self._refusal = refusal
        self._buffer = b""
        self._timer = asyncio.get_running_loop().call_later(gate.timeout, self.close, _NORMAL)
        gate.open.add(self)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        while not self._transport.is_closing():
            frame = _client_frame(buffer, self._gate.frame_limit)
            if frame is None:
                break
            if isinstance(frame, int):
                return self.close(frame)
            opcode, payload, buffer = frame
            if opcode == _OP_TEXT:
                try:
                    answer = refusal_answer(payload.decode("utf-8"), self._refusal)
                except UnicodeDecodeError:
                    return self.close(_NOT_TEXT)
                if answer is CLOSE:
                    return self.close(_NORMAL)
                if isinstance(answer, str):
                    self._transport.write(websocket_frame(answer))
            elif opcode == _OP_PING:
                self._transport.write(frame_header(0x80 | _OP_PONG, len(payload)) + payload)
            elif opcode != _OP_PONG:  # binary, close, fragments: as through aiohttp, the end
                return self.close(_NORMAL)
        self._buffer = buffer

    def close(self, code: int) -> None:
        if not self._transport.is_closing():
            self._transport.write(frame_header(0x80 | _OP_CLOSE, 2) + code.to_bytes(2, "big"))
            self._transport.close()  # after the close frame has been written
        self.lost()

    def lost(self) -> None:
        self._timer.cancel()
        self._gate.open.discard(self)


def _client_frame(buffer: bytes, limit: int) -> tuple[int, bytes, bytes] | int | None:
    """The first whole frame in `buffer` from a client as (opcode, unmasked payload, rest);
    None if it is not all there yet; a close code if it breaks RFC 6455 or `limit`."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    if first & 0x70 or not second & 0x80:  # extension bits we never agreed to; a client must mask
        return _PROTOCOL_ERROR
    if not first & 0x80 or first & 0x0F == _OP_CONTINUATION:
        return _NORMAL  # fragments: no CONNECT comes that way
    length, start = second & 0x7F, 2
    if length >= 126:
        start = 4 if length == 126 else 10
        if len(buffer) < start:
            return None
        length = int.from_bytes(buffer[2:start], "big")
    if length > limit:
        return _TOO_BIG
    end = start + 4 + length
    if len(buffer) < end:
        return None
    mask = buffer[start : start + 4]
    masked = buffer[start + 4 : end]
    keystream = (mask * (length // 4 + 1))[:length]
    payload = (int.from_bytes(masked, "big") ^ int.from_bytes(keystream, "big")).to_bytes(length, "big")
    return first & 0x0F, payload, buffer[end:]
