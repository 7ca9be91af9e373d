"""The Engine.IO server chatd serves: direct websocket writes, a ping timer, early refusals.

python-engineio's websocket path gives every connection a writer task, a
queue, a task per received frame and a task asleep until the next ping; its
room emits (python-socketio) add a task per recipient. Profiled under a
broadcast to thousands of sockets, that machinery, not the socket writes, was
most of the server's time. Here:

- `DirectWebSocket`, engine.io's aiohttp websocket wrapper: permessage-deflate
  only when asked for (`--websocket-compression`), and uncompressed frames
  written without awaiting, those of one event-loop turn in one socket write
  (`Flusher`).
- `DirectSocket`, the engine.io socket of a connection that opened on the
  websocket transport uncompressed: every packet is written to the transport
  as it is sent (in the order of the calls), frames are read in the request's
  own task. Connections upgrading from polling keep engine.io's queue (what
  was queued while polling must go first).
- `EngineSocket`, engine.io's socket closing the session on what Engine.IO v4
  forbids (undecodable packets, a second concurrent long-poll), and ending the
  transport at the client's CLOSE; `DirectSocket` is one.
- `EngineServer`, engine.io's server using those, with a timer instead of
  the task per socket that sleeps until the next ping, and an early answer to
  websocket handshakes that can only be refused (no Engine.IO socket, no
  Socket.IO session, no task), still inside aiohttp's request handling.
- Slow readers (SPEC "Protecting the server"): what waits for one connection
  is counted where it waits — engine.io's per-socket queue (`BoundedQueue`,
  polling and upgraded connections) and the asyncio transport's write buffer
  (websockets) — and a connection with more than `max_backlog_bytes` waiting,
  or a frame waiting for more than `max_backlog_seconds`, is cut off at once
  (`EngineServer.cut_off`): its queue emptied, its TCP connection aborted.
  Nothing awaits a slow socket, so a broadcast never slows down for one.

Private names used here are listed in chatd/sio/__init__.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import struct
import time
import weakref
from typing import Awaitable, Callable, Iterable, Sequence

import engineio
from aiohttp import WSMsgType, web
from aiohttp.web import WebSocketResponse
from engineio import exceptions
from engineio import packet as eio_packet
from engineio import payload as eio_payload
from engineio.async_drivers.aiohttp import WebSocket as EngineWebSocket
from engineio.async_socket import AsyncSocket

from ..tasks import TaskOwner

log = logging.getLogger("chatd.sio")

_FIN = 0x80
_TEXT, _BINARY = 0x1, 0x2  # websocket opcodes; server frames are never masked

# SPEC "Protecting the server": a connection with more than this waiting for it, or
# a frame waiting longer than this, is closed.
MAX_BACKLOG_BYTES = 1 << 20
MAX_BACKLOG_SECONDS = 30.0
PACKET_OVERHEAD = 64  # what a queued packet costs beyond its data (objects, the queue's slot)
HOLD_ABOVE = 64 * 1024  # a transport's buffer beyond this: frames are held (asyncio's default high-water mark)


def websocket_frame(data: str | bytes) -> bytes:
    """One complete, uncompressed websocket frame (RFC 6455 section 5.2): text for str, binary for bytes."""
    if isinstance(data, str):
        first, payload = _FIN | _TEXT, data.encode("utf-8")
    else:
        first, payload = _FIN | _BINARY, bytes(data)
    return frame_header(first, len(payload)) + payload


def frame_header(first: int, n: int) -> bytes:
    if n < 126:
        return struct.pack("!BB", first, n)
    if n < 65536:
        return struct.pack("!BBH", first, 126, n)
    return struct.pack("!BBQ", first, 127, n)


class DirectWebSocket(EngineWebSocket):
    """engine.io's aiohttp websocket wrapper: uncompressed unless asked, written without awaiting.

    A connection that opened on the websocket transport and is not compressed
    is "direct": its engine.io socket becomes a `DirectSocket`, which writes
    every packet straight to the transport and reads in the request's own task.
    A connection upgrading from polling keeps engine.io's queue and writer task
    (packets queued while polling must go first); uncompressed, its frames are
    still written without awaiting.
    """

    compression = False  # set per server by `EngineServer`
    flusher: "Flusher"  # one per server, set by `EngineServer`

    def __init__(self, handler, server) -> None:
        super().__init__(handler, server)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        # None: nothing written this event-loop turn; else what waits for the turn's end
        self._pending: list[bytes | memoryview] | None = None
        self.raw = False  # frames go straight to the transport
        self.direct = False  # the socket is a DirectSocket writing through us
        # Frames the client has not taken yet: the transport's buffer up to HOLD_ABOVE, then
        # `held` (references to the frames as written, shared with the room's other sockets).
        self.waiting = Waiting()
        self.held: collections.deque[bytes | memoryview] = collections.deque()
        self.held_bytes = 0
        self.draining = False
        queue = getattr(handler.__self__, "queue", None)
        if isinstance(queue, BoundedQueue):
            queue.websocket = self  # so that cutting the socket off reaches its TCP connection

    async def __call__(self, environ):
        request = environ["aiohttp.request"]
        # The handler is the engine.io socket's bound `_websocket_handler`. A socket
        # that is already connected is upgrading from polling.
        socket: EngineSocket = self.handler.__self__
        websocket_first = not socket.connected and type(socket) is EngineSocket
        self._sock = WebSocketResponse(max_msg_size=self.server.max_http_buffer_size, compress=self.compression)
        if websocket_first:
            # Hold the 101 response's headers back, to leave in one write with engine.io's OPEN.
            self._sock._send_headers_immediately = False
        self.http_writer = await self._sock.prepare(request)
        self.transport = request.transport
        self.raw = not self._sock.compress
        self.environ = environ
        if websocket_first and not self.raw:
            self.http_writer.send_headers()
        if websocket_first and self.raw:
            socket.__class__ = DirectSocket  # same object, same state; see DirectSocket
            socket.websocket = self
            self.direct = True
            try:
                await socket._websocket_handler(self)
            finally:
                self.direct = False
                socket.websocket = None
        else:
            await self.handler(self)
        return self._sock

    def writable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and not self._sock.closed

    def write(self, frame: bytes) -> None:
        """Write a frame: now when the server is quiet, else at the end of this event-loop turn.

        Quiet (no frames in the last few milliseconds), the turn's first frame
        leaves at once: a lone message reaches the first of a room's thousand
        sockets without waiting for the last to be handled. Busy, and for any
        later frame of the same turn, frames are held and leave in one socket
        write when the turn ends: under load several broadcasts finish in one
        turn, and a write costs far more than joining bytes. Order is kept;
        nothing waits longer than the turn.
        """
        self.write_parts((frame,))

    def write_text(self, parts: Iterable[bytes | memoryview]) -> None:
        """`write` of one text frame whose UTF-8 payload is `parts`, which are not copied."""
        parts = list(parts)
        self.write_parts([frame_header(_FIN | _TEXT, sum(len(part) for part in parts)), *parts])

    def write_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """`write` of bytes that make up frames, in order, as they are (not copied)."""
        if not self.writable():
            raise ConnectionResetError("the websocket is closed")
        if self._pending is None:
            if self.flusher.add(self):
                self._pending = []  # written this turn: what follows waits for the flush
                self._send(parts)
            else:
                self._pending = list(parts)
        else:
            self._pending.extend(parts)

    def write_now(self, frame: bytes) -> None:
        """`write` of a frame for a socket `direct_websocket` just found writable, to the
        transport at once unless frames of this turn wait for it (then after them).

        For a broadcast sliced over turns (presence to thousands), where a socket gets
        one frame per turn: there is nothing to gather, and passing every socket
        through the turn's flush as well cost 0.6–1.5 µs of its 6–7 µs of Python
        (measured interleaved, both ways in one process; docs/performance.md).
        """
        if self._pending is None:
            self._send((frame,))
        else:
            self._pending.append(frame)

    def flush(self) -> None:
        frames, self._pending = self._pending, None
        if frames and self.writable():
            self._send(frames)

    def _send(self, parts: Sequence[bytes | memoryview]) -> None:
        if self.held or self.transport.get_write_buffer_size() > HOLD_ABOVE:
            self._hold(parts)  # the client does not keep up
            return
        if len(parts) == 1:
            self.transport.write(parts[0])
        else:  # one system call (writev), no joining copy
            self.transport.writelines(parts)
        if self.transport.get_write_buffer_size():  # some wait: watch them
            self.waiting.given(sum(len(part) for part in parts), time.monotonic())
            self.server.watch(self)
        elif self.waiting.marks:  # all taken (bytes counted only from when some waited)
            self.waiting.clear()

    def _hold(self, parts: Sequence[bytes | memoryview]) -> None:
        """Keep frames for a client that does not keep up, as references, not in the transport.

        The transport would copy each into one growing buffer per socket (and the
        allocator would keep the fragments long after); held here, a broadcast's
        frame is one object however many slow sockets wait for it. A task (one per
        slow socket only) passes them on as the transport drains.
        """
        n = sum(len(part) for part in parts)
        self.held.extend(parts)
        self.held_bytes += n
        self.waiting.given(n, time.monotonic())
        if not self.draining:
            self.draining = True
            self.server.tasks.spawn(self._drain_held())
        self.server.watch(self)

    async def _drain_held(self) -> None:
        try:
            while self.held and self.writable():
                await self.http_writer.drain()  # until the transport's buffer is low again
                if not self.writable():
                    break
                chunk, size = [], 0
                while self.held and size < HOLD_ABOVE:
                    part = self.held.popleft()
                    chunk.append(part)
                    size += len(part)
                self.held_bytes -= size
                self.transport.writelines(chunk)
        except Exception:  # the connection is gone: its reader closes the socket
            log.debug("could not pass held frames on", exc_info=True)
        finally:
            self.draining = False

    def drop_held(self) -> None:
        self.held.clear()
        self.held_bytes = 0
        self.waiting.clear()

    def backlog(self) -> int:
        """Bytes written and not yet taken by the kernel: held here and in the transport's buffer."""
        if self.transport is None or self.transport.is_closing():
            return 0
        return self.held_bytes + self.transport.get_write_buffer_size()

    def waiting_since(self) -> float | None:
        """When the oldest byte still in the transport's buffer was written (monotonic), or None."""
        backlog = self.backlog()
        if not backlog:
            self.waiting.clear()
            return None
        return self.waiting.since(backlog)

    def owner(self) -> AsyncSocket:
        return self.handler.__self__

    async def close(self) -> None:
        self.flush()  # what was written goes before the close frame
        if self.held and self.writable():
            self.transport.writelines(self.held)
        self.drop_held()
        await super().close()

    async def send(self, message) -> None:
        if self.raw:
            self.write(websocket_frame(message))
        else:
            await super().send(message)

    async def wait(self):
        """The next frame, for engine.io's own reader (upgraded or compressed connections).

        engine.io decodes what this returns outside any `try`, so a frame that is
        no Engine.IO packet would end its reader with a traceback and leave the
        session open: here the session is closed, as the protocol asks, and the
        reader sees its connection end (OSError).
        """
        data = await super().wait()
        try:
            eio_packet.Packet(encoded_packet=data)
        except Exception:
            await self.handler.__self__.close_now(refused=True)
            raise OSError("not an Engine.IO packet") from None
        return data


class Flusher:
    """Flushes, at the end of the event-loop turn, every websocket written to in it.

    One callback for a broadcast to thousands of sockets, not one per socket.
    It also tells whether this turn's first frames may be written at once: yes
    when no turn has flushed, or written at once (`written_at_once`), in the last
    QUIET_SECONDS (see `DirectWebSocket.write`).
    """

    QUIET_SECONDS = 0.002

    def __init__(self) -> None:
        self._written: list[DirectWebSocket] = []
        self._quiet = True
        self._last_flush = 0.0

    def add(self, ws: "DirectWebSocket") -> bool:
        """Flush `ws` at the end of this turn; True when it may write its first frame now."""
        if not self._written:
            self._quiet = time.monotonic() - self._last_flush > self.QUIET_SECONDS
            ws.loop.call_soon(self._flush_all)
        self._written.append(ws)
        return self._quiet

    def _flush_all(self) -> None:
        written, self._written = self._written, []
        for ws in written:
            try:
                ws.flush()
            except Exception:  # one broken transport must not keep the others' frames
                log.debug("could not flush a websocket", exc_info=True)
        self._last_flush = time.monotonic()

    def written_at_once(self) -> None:
        """Frames went to transports outside the turn's flush (`DirectWebSocket.write_now`):
        for the quiet rule that is a flush too, else the next turn would write at once."""
        self._last_flush = time.monotonic()


class Waiting:
    """When the bytes given to a slow consumer were given, to within a second, in little memory.

    A list of (bytes given in total at the end of a second, that second); given
    the number still waiting, the oldest of them is found in the first entry
    that is not yet wholly taken.
    """

    def __init__(self) -> None:
        self.total = 0
        self.marks: collections.deque[list] = collections.deque()

    def given(self, n: int, now: float) -> None:
        self.total += n
        if self.marks and now - self.marks[-1][1] < 1.0:
            self.marks[-1][0] = self.total
        else:
            self.marks.append([self.total, now])

    def since(self, still_waiting: int) -> float | None:
        taken = self.total - still_waiting
        while self.marks and self.marks[0][0] <= taken:
            self.marks.popleft()
        return self.marks[0][1] if self.marks else None

    def clear(self) -> None:
        self.marks.clear()


def packet_size(pkt) -> int:
    """About what an Engine.IO packet waiting in a queue holds (its text as characters)."""
    data = getattr(pkt, "data", None)
    if isinstance(data, (str, bytes)):
        return len(data) + PACKET_OVERHEAD
    return 256 + PACKET_OVERHEAD  # OPEN's dict, None, …: small


class BoundedQueue(asyncio.Queue):
    """engine.io's per-socket packet queue (polling and upgraded connections), counting what waits in it.

    engine.io's queue has no bound: a polling client that never asks, or an
    upgraded websocket whose writer waits on a full socket, would hold every
    packet sent to it. Each packet put here is counted (`packet_size`), and the
    server is told, so that it can cut the connection off (`EngineServer.cut_off`).
    After that, the queue drops what is put in it but the `None` that ends engine.io's
    poll and writer.
    """

    def __init__(self, server: "EngineServer") -> None:
        super().__init__()
        self.server = server
        self.bytes = 0
        self.waiting = Waiting()
        self.cut = False
        # The connection's websocket, once it has one; weak, since the websocket holds the
        # socket that holds this queue (a cycle would wait for the cyclic collector).
        self._websocket: weakref.ref[DirectWebSocket] | None = None

    @property
    def websocket(self) -> "DirectWebSocket | None":
        return self._websocket() if self._websocket is not None else None

    @websocket.setter
    def websocket(self, ws: "DirectWebSocket") -> None:
        self._websocket = weakref.ref(ws)

    def put_nowait(self, item) -> None:  # asyncio.Queue.put() calls this too
        if item is None:
            return super().put_nowait(item)
        if self.cut:
            return  # the connection is being closed: nothing more is kept for it
        size = packet_size(item)
        super().put_nowait(item)
        self.bytes += size
        self.waiting.given(size, time.monotonic())
        self.server.watch(self)

    def get_nowait(self):  # asyncio.Queue.get() calls this too
        item = super().get_nowait()
        if item is not None:
            self.bytes -= packet_size(item)
        return item

    def backlog(self) -> int:
        return self.bytes + (self.websocket.backlog() if self.websocket is not None else 0)

    def waiting_since(self) -> float | None:
        if not self.bytes:
            self.waiting.clear()
            return None
        return self.waiting.since(self.bytes)

    def discard(self) -> None:
        """Drop every queued packet, and all later ones: the connection is cut off."""
        self.cut = True
        while not self.empty():
            self.get_nowait()
            self.task_done()
        self.waiting.clear()

    def owner(self) -> AsyncSocket | None:
        # engine.io makes the queue before the socket it belongs to; asked only on a cut-off
        return next((s for s in self.server.sockets.values() if s.queue is self), None)


class ProtocolError(exceptions.EngineIOError):
    """A client broke the Engine.IO or Socket.IO protocol; its session is closed (HTTP 400 for a poll or POST)."""


# What an Engine.IO v4 client sends on an open session (its probe PING is read by the
# upgrade itself): anything else, like a packet that does not decode, closes the session.
CLIENT_PACKETS = frozenset({eio_packet.PONG, eio_packet.MESSAGE, eio_packet.UPGRADE, eio_packet.CLOSE})


class EngineSocket(AsyncSocket):
    """engine.io's socket, closing the session on what the protocol forbids (engine.io ignores it).

    - A packet that does not decode, or of a type no client sends, closes the
      session: a POST that carries it gets 400, a websocket is closed.
    - A second long-poll while one is pending closes the session: the pending
      one gets CLOSE, the second 400.
    - The client's CLOSE ends the transport at once: a pending long-poll gets
      NOOP, a websocket is closed (engine.io leaves both to their timeouts).
    """

    input_refused = False  # closed for breaking the protocol
    polling = False  # a long-poll GET is pending
    held: list | None = None  # messages held back while a Socket.IO CONNECT is answered (see `hold`)

    def hold(self) -> None:
        """Hold back the messages sent from now on until `unhold`: a socket that enters its rooms
        while its Socket.IO CONNECT is being handled must not get their events before the answer.
        Engine.IO's own packets (PING, CLOSE) are not held."""
        self.held = []

    def unhold(self) -> list:
        """Stop holding; what was held, in order, for the caller to send or drop."""
        held, self.held = self.held or [], None
        return held

    def holds(self, pkt) -> bool:
        return self.held is not None and pkt.packet_type == eio_packet.MESSAGE

    async def send(self, pkt) -> None:
        if self.holds(pkt):
            return self.held.append(pkt)
        await super().send(pkt)

    async def close_now(self, refused: bool = False) -> None:
        """Close at once: CLOSE to the client, the disconnect handlers run, the transport ended
        (a pending long-poll answered, a websocket's writer ended), without waiting for the queue."""
        self.input_refused = self.input_refused or refused
        await self.close(wait=False)
        self.queue.put_nowait(None)

    async def receive(self, pkt) -> None:
        if pkt.packet_type not in CLIENT_PACKETS:
            return await self.close_now(refused=True)
        await super().receive(pkt)
        if pkt.packet_type == eio_packet.CLOSE:
            if not self.upgraded:
                self.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))  # the pending long-poll's answer
            self.queue.put_nowait(None)

    async def handle_get_request(self, environ):
        if environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            return await super().handle_get_request(environ)
        if self.polling:
            await self.close_now(refused=True)
            raise ProtocolError("a second long-poll while one is pending")
        self.polling = True
        try:
            return await super().handle_get_request(environ)
        finally:
            self.polling = False

    async def handle_post_request(self, environ) -> None:
        """engine.io's, but a payload that does not decode closes the session (engine.io answers
        200 and logs a traceback), and so does one too long (engine.io waits for a poll first)."""
        length = int(environ.get("CONTENT_LENGTH", "0"))
        if length > self.server.max_http_buffer_size:
            await self.close_now(refused=True)
            raise exceptions.ContentTooLongError()
        body = await environ["wsgi.input"].read(length)
        try:
            packets = eio_payload.Payload(encoded_payload=body.decode("utf-8")).packets
        except Exception:
            await self.close_now(refused=True)
            raise ProtocolError("an undecodable payload") from None
        for pkt in packets:
            if self.closed:
                break
            await self.receive(pkt)
        # Raised with nothing awaited since the CLOSE was queued, so engine.io's handle_request
        # still finds the session and answers 400 (had a long-poll removed it meanwhile, it
        # would fail with UnboundLocalError: see upstream U4 in __init__.py).
        if self.input_refused:
            raise ProtocolError("a packet the protocol forbids")


class DirectSocket(EngineSocket):
    """An engine.io socket on a direct websocket: no queue, no writer task, no task per received frame.

    engine.io's own socket keeps, for every websocket, a writer task waiting on
    a queue, a task per received frame (`ensure_future` + `wait_for`) and a ping
    task. Here packets are written as they are sent (their order is the order of
    the calls) and frames are read in the request's task with aiohttp's own
    timeout. Everything else (ping/pong, close, packet handling) is engine.io's.
    """

    websocket: DirectWebSocket | None = None

    def send_now(self, pkt) -> None:
        ws = self.websocket
        if ws is not None:
            try:
                ws.write(websocket_frame(pkt.encode()))
            except ConnectionResetError:
                pass  # the reader notices the closed connection and closes the socket
            if pkt.packet_type == eio_packet.CLOSE:
                # Close the transport too: some clients wait for the server to do it.
                self.server.tasks.spawn(ws.close())

    async def send(self, pkt) -> None:
        if self.websocket is None or self.holds(pkt):
            return await super().send(pkt)
        if await self.check_ping_timeout():
            self.send_now(pkt)

    async def _websocket_handler(self, ws) -> None:
        if not ws.direct:  # pragma: no cover - DirectWebSocket only sends direct connections here
            return await super()._websocket_handler(ws)
        self.connected = True
        self.upgraded = True
        # What engine.io queued before the websocket existed (its OPEN), in one write
        # with the 101 response's headers.
        first = []
        while not self.queue.empty():
            pkt = self.queue.get_nowait()
            self.queue.task_done()
            if pkt is not None:
                first.append(websocket_frame(pkt.encode()))
        if first:
            await ws.http_writer.write(b"".join(first))
        else:  # pragma: no cover - engine.io always queues its OPEN first
            ws.http_writer.send_headers()
        timeout = self.server.ping_interval + self.server.ping_timeout
        aiohttp_ws = ws._sock
        try:
            while True:
                try:
                    msg = await aiohttp_ws.receive(timeout=timeout)
                except Exception:  # asyncio.TimeoutError: the client is gone
                    break
                if msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
                    break  # closed, closing or broken (aiohttp enforces max_msg_size)
                try:
                    pkt = eio_packet.Packet(encoded_packet=msg.data)
                except Exception:  # not an Engine.IO packet: the protocol says close
                    await self.close_now(refused=True)
                    break
                try:
                    await self.receive(pkt)
                except exceptions.SocketIsClosedError:
                    break
                except Exception:
                    log.debug("could not handle a frame", exc_info=True)
                if self.closed:  # the client's CLOSE, or a packet that broke the protocol
                    break
        finally:
            # Also when aiohttp cancels this task because the connection went away:
            # the socket first (its disconnect handlers run now), then the websocket,
            # whose close can wait for a close frame from a peer that is gone.
            await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
            await ws.close()


def direct_websocket(socket: AsyncSocket | None) -> DirectWebSocket | None:
    """The socket's websocket when packets may be written to it directly."""
    if socket is None or socket.closing or socket.closed:
        return None
    ws = getattr(socket, "websocket", None)
    if ws is None or not ws.direct or not ws.writable() or socket.held is not None:
        return None  # (held: sent through `socket.send`, which holds it)
    return ws


class EngineServer(engineio.AsyncServer):
    """engine.io's server with direct websockets and a timer instead of a ping task per socket."""

    def __init__(
        self,
        *args,
        websocket_compression: bool = False,
        max_backlog_bytes: int = MAX_BACKLOG_BYTES,
        max_backlog_seconds: float = MAX_BACKLOG_SECONDS,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_backlog_bytes = max_backlog_bytes
        self.max_backlog_seconds = max_backlog_seconds
        self.watched: set[BoundedQueue | DirectWebSocket] = set()  # with something waiting
        self._sweep_timer: asyncio.TimerHandle | None = None
        self.cut_off_count = 0
        self.on_cut_off: Callable[[], None] = lambda: None  # the metrics' counter
        websocket = type(
            "DirectWebSocket", (DirectWebSocket,), {"compression": websocket_compression, "flusher": Flusher()}
        )
        self._async = {**self._async, "websocket": websocket}
        self.tasks = TaskOwner("engine.io")  # websocket closes started from synchronous sends
        # Set by the Socket.IO side: the Socket.IO CONNECT_ERROR packet (encoded) that a
        # handshake will get, known from its request alone, or None to connect as usual.
        self.early_refusal: Callable[[dict], Awaitable[str | None]] | None = None

    async def _handle_connect(self, environ, transport, jsonp_index=None):
        # A websocket handshake that will be refused (no valid session) is answered
        # here, without an Engine.IO socket, a Socket.IO session or a task: that
        # machinery was most of what a refusal cost. Origin, transport and protocol
        # version have been checked already (handle_request).
        if transport == "websocket" and self.early_refusal is not None:
            refusal = await self.early_refusal(environ)
            if refusal is not None:
                return await self._refuse_websocket(environ, refusal)
        return await self._open_session(environ, transport, jsonp_index)

    async def _open_session(self, environ, transport, jsonp_index):
        """engine.io's `_handle_connect`, with chatd's socket class and an OPEN packet whose
        pingInterval is right below a second (engine.io rounds 0.3 s down to 0)."""
        if self.start_service_task:  # engine.io's sweep of closed and timed-out sockets
            self.start_service_task = False
            self.service_task_handle = self.start_background_task(self._service_task)
        sid = self.generate_id()
        socket = self.sockets[sid] = EngineSocket(self, sid)
        await socket.send(eio_packet.Packet(eio_packet.OPEN, self.open_data(sid, self._upgrades(sid, transport))))
        ret = await self._trigger_event("connect", sid, environ, run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            return self._unauthorized(ret or None)
        socket.schedule_ping()
        if transport == "websocket":
            ret = await socket.handle_get_request(environ)
            if socket.closed:
                self.sockets.pop(sid, None)
            return ret
        socket.connected = True
        try:
            return self._ok(await socket.poll(), jsonp_index=jsonp_index)
        except exceptions.QueueEmpty:
            return self._bad_request()

    def _ok(self, packets=None, headers=None, jsonp_index=None):
        response = super()._ok(packets, headers=headers, jsonp_index=jsonp_index)
        if packets is None:
            response["response"] = b"ok"  # the protocol's answer to a POST (engine.io says "OK")
        return response

    async def _refuse_websocket(self, environ, refusal: str) -> WebSocketResponse:
        """Open the websocket as engine.io does, answer the client's CONNECT with `refusal`, wait for it to go."""
        ws = WebSocketResponse(max_msg_size=self.max_http_buffer_size, compress=False)
        ws._send_headers_immediately = False  # the headers leave with the OPEN packet
        http_writer = await ws.prepare(environ["aiohttp.request"])
        await http_writer.write(websocket_frame(self.open_packet(self.generate_id())))
        while True:
            try:
                msg = await ws.receive(timeout=self.refusal_timeout)
            except Exception:  # asyncio.TimeoutError
                break
            if msg.type is not WSMsgType.TEXT:
                break
            answer = refusal_answer(msg.data, refusal)
            if answer is CLOSE:
                break
            if answer is not None:
                await ws.send_str(answer)
        await ws.close()
        return ws

    @property
    def refusal_timeout(self) -> float:
        """How long a refused websocket may stay open: a client's CONNECT comes at once."""
        return self.ping_interval + self.ping_timeout

    def open_packet(self, sid: str) -> str:
        """Engine.IO's OPEN packet (encoded) for a new websocket."""
        return eio_packet.Packet(eio_packet.OPEN, self.open_data(sid, [])).encode()

    def open_data(self, sid: str, upgrades: list[str]) -> dict:
        return {
            "sid": sid,
            "upgrades": upgrades,
            "pingTimeout": round(self.ping_timeout * 1000),
            "pingInterval": round((self.ping_interval + self.ping_interval_grace_period) * 1000),
            "maxPayload": self.max_http_buffer_size,
        }

    def direct_websocket(self, eio_sid: str) -> DirectWebSocket | None:
        """The connection's websocket when packets may be written to it directly, else None."""
        return direct_websocket(self.sockets.get(eio_sid))

    async def send_text(self, eio_sid: str, parts: Sequence[bytes | memoryview]) -> None:
        """Send one Engine.IO MESSAGE whose UTF-8 text is `parts`, without copying them on a direct websocket."""
        ws = self.direct_websocket(eio_sid)
        if ws is not None:
            ws.write_text((b"4", *parts))  # "4": an Engine.IO MESSAGE
        else:  # polling, upgraded or compressed: through engine.io's queue
            await self.send(eio_sid, b"".join(parts).decode("utf-8"))

    async def close_transport(self, eio_sid: str) -> None:
        """Close a connection now, whatever its client does, without waiting for its queue to drain
        (engine.io's own `disconnect()` waits, and hangs for good on a client gone mid-close)."""
        socket = self.sockets.get(eio_sid)
        if socket is not None:
            await socket.close_now()

    def hold(self, eio_sid: str) -> None:
        socket = self.sockets.get(eio_sid)
        if socket is not None:
            socket.hold()

    def unhold(self, eio_sid: str) -> list:
        socket = self.sockets.get(eio_sid)
        return socket.unhold() if socket is not None else []

    async def send_held(self, eio_sid: str, held: list) -> None:
        """Send what `unhold` returned, unless the connection closed meanwhile."""
        socket = self.sockets.get(eio_sid)
        for pkt in held:
            if socket is None or socket.closed:
                return
            await socket.send(pkt)

    async def refuse_input(self, eio_sid: str) -> None:
        """Close a connection whose client broke the protocol (a POST in progress gets 400)."""
        socket = self.sockets.get(eio_sid)
        if socket is not None:
            await socket.close_now(refused=True)

    async def disconnect(self, sid=None):
        """engine.io's `disconnect`, but one socket is closed without waiting for its queue to drain.

        engine.io calls it on a polling POST it cannot read; waiting there held the
        request (and the connection) until the client polled again, forever if it
        never did (tests/test_attacks.py)."""
        if sid is None:
            return await super().disconnect()
        await self.close_transport(sid)
        self.sockets.pop(sid, None)

    async def handle_request(self, request, *args, **kwargs):
        # engine.io takes a request without `transport` for polling; the protocol makes it mandatory.
        if "transport" not in request.query:
            return web.Response(status=400, content_type="text/plain", text='"Missing transport"')
        # engine.io answers a POST to a socket that is closed but not yet forgotten by
        # raising KeyError out of the request (a 500); forget it first, for a 400.
        sid = request.query.get("sid") if request.method == "POST" else None
        if sid is not None and sid in self.sockets and self.sockets[sid].closed:
            del self.sockets[sid]
        return await super().handle_request(request, *args, **kwargs)

    async def close_all(self) -> None:
        for eio_sid in list(self.sockets):
            await self.close_transport(eio_sid)
        # The websockets' closes just started: cut short, their handlers would hold shutdown.
        await self.tasks.close(grace=1.0)

    # -- slow readers ------------------------------------------------------------

    def create_queue(self, *args, **kwargs):
        return BoundedQueue(self)  # every engine.io socket's queue (BaseSocket.__init__)

    def watch(self, waiter: "BoundedQueue | DirectWebSocket") -> None:
        """Something now waits for a client: cut it off if that is too much, else look again soon."""
        if waiter.backlog() > self.max_backlog_bytes:
            self.cut_off(waiter)
            return
        self.watched.add(waiter)
        if self._sweep_timer is None:
            interval = min(1.0, self.max_backlog_seconds / 4)
            self._sweep_timer = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Cut off the connections whose oldest frame has waited too long; forget those drained."""
        self._sweep_timer = None
        deadline = time.monotonic() - self.max_backlog_seconds
        for waiter in list(self.watched):
            since = waiter.waiting_since()
            if since is None:
                self.watched.discard(waiter)
            elif since < deadline or waiter.backlog() > self.max_backlog_bytes:
                self.cut_off(waiter)
        if self.watched:
            interval = min(1.0, self.max_backlog_seconds / 4)
            self._sweep_timer = asyncio.get_running_loop().call_later(interval, self._sweep)

    def cut_off(self, waiter: "BoundedQueue | DirectWebSocket") -> None:
        """Close a connection that does not read: its queue emptied, its TCP connection aborted (the
        client sees it drop), its disconnect handlers run in a task. Never awaits: called mid-broadcast."""
        self.watched.discard(waiter)
        socket = waiter.owner()
        if socket is None or socket.closed:
            return
        queue = socket.queue
        if isinstance(queue, BoundedQueue):
            if queue.cut:
                return
            queue.discard()
            self.watched.discard(queue)
            ws = queue.websocket or getattr(socket, "websocket", None)
        else:  # pragma: no cover - every queue is ours
            ws = getattr(socket, "websocket", None)
        if isinstance(waiter, DirectWebSocket):
            ws = waiter
        if ws is not None:
            self.watched.discard(ws)
            ws.drop_held()
            if ws.transport is not None:
                ws.transport.abort()  # drops what it holds for the client at once
        self.cut_off_count += 1
        self.on_cut_off()
        log.info("closed a connection that does not read (%s)", socket.sid)
        if not socket.closing:
            self.tasks.spawn(socket.close(wait=False, abort=True, reason=self.reason.TRANSPORT_ERROR))
        queue.put_nowait(None)  # ends engine.io's poll or writer

    def start_background_task(self, target, *args, **kwargs):
        # engine.io keeps one task per socket asleep for the ping interval, even
        # after the socket closed (AsyncSocket.schedule_ping). A timer does the
        # same wait for a fraction of the memory, and sends the PING the same way.
        if getattr(target, "__func__", None) is AsyncSocket._send_ping:
            return asyncio.get_running_loop().call_later(self.ping_interval, _ping, target.__self__)
        return super().start_background_task(target, *args, **kwargs)


CLOSE = object()


INVALID_NAMESPACE = {"message": "Invalid namespace"}  # a CONNECT_ERROR's payload is an object in Socket.IO v5


def refusal_answer(text: str, refusal: str) -> str | object | None:
    """What a refused websocket answers to a text message: `refusal` (the CONNECT_ERROR)
    to a CONNECT, an error to a CONNECT elsewhere, nothing to a PONG; anything else (the
    client's CLOSE, a packet that breaks the protocol, one that needs a connected socket) CLOSE."""
    if text == "40" or text.startswith("40{"):  # CONNECT to namespace "/"
        return "4" + refusal
    if text.startswith("40/"):  # another namespace: chatd has none
        namespace = text[2:].split(",", 1)[0]
        return f"44{namespace}," + json.dumps(INVALID_NAMESPACE, separators=(",", ":"))
    return None if text == "3" else CLOSE


def _ping(socket: AsyncSocket) -> None:
    """What `AsyncSocket._send_ping` does after its sleep, without a task."""
    if not socket.closing and not socket.closed:
        socket.last_ping = time.time()
        pkt = eio_packet.Packet(eio_packet.PING)
        if isinstance(socket, DirectSocket) and socket.websocket is not None:
            socket.send_now(pkt)
        else:
            socket.queue.put_nowait(pkt)
