"""The library internals chatd/broadcast.py relies on. setup.cfg pins python-engineio's
and python-socketio's minor versions; when an upgrade moves one of these, this fails
first, and broadcast.py must be checked against the new sources."""

from __future__ import annotations

import inspect

import aiohttp.http_writer
import aiohttp.web
import engineio
import socketio
from engineio import async_server, async_socket, base_socket
from engineio.async_drivers import aiohttp as engineio_aiohttp
from socketio.async_pubsub_manager import AsyncPubSubManager

from chatd.broadcast import DirectSocket, EngineServer, FastBroadcastMixin


def source(obj) -> str:
    return inspect.getsource(obj)


def test_engineio_creates_plain_sockets_and_hands_the_websocket_its_bound_handler():
    # DirectWebSocket finds the engine.io socket as `handler.__self__` and, for a
    # websocket-first connection, switches it to DirectSocket (no __slots__ anywhere).
    assert "async_socket.AsyncSocket(self, sid)" in source(async_server.AsyncServer._handle_connect)
    assert "self._websocket_handler, self.server)" in source(async_socket.AsyncSocket._upgrade_websocket)
    assert "self.connected = True" in source(async_socket.AsyncSocket._websocket_handler)
    for cls in async_socket.AsyncSocket.__mro__[:-1]:
        assert "__slots__" not in vars(cls), cls
    assert DirectSocket.__mro__[1] is async_socket.AsyncSocket


def test_engineio_socket_state_and_methods_we_use():
    socket = base_socket.BaseSocket.__new__(base_socket.BaseSocket)
    base_socket.BaseSocket.__init__(socket, type("S", (), {"create_queue": lambda self: object()})(), "sid")
    for name in ("queue", "last_ping", "connected", "upgraded", "closing", "closed"):
        assert hasattr(socket, name), name
    for name in ("send", "receive", "close", "check_ping_timeout", "schedule_ping", "_send_ping"):
        assert callable(getattr(async_socket.AsyncSocket, name)), name
    # The ping task we replace with a timer, recognised by its target.
    assert "start_background_task(self._send_ping)" in source(async_socket.AsyncSocket.schedule_ping)
    assert "self.last_ping = time.time()" in source(async_socket.AsyncSocket._send_ping)
    assert "packet.PING" in source(async_socket.AsyncSocket._send_ping)


def test_engineio_aiohttp_driver_shape():
    params = list(inspect.signature(engineio_aiohttp.WebSocket.__init__).parameters)
    assert params == ["self", "handler", "server"]
    assert "self._sock = WebSocketResponse(" in source(engineio_aiohttp.WebSocket.__call__)
    assert "self._sock" in source(engineio_aiohttp.WebSocket.close)
    assert engineio_aiohttp._async["websocket"] is engineio_aiohttp.WebSocket
    assert "self.server._async['websocket'](" in source(async_socket.AsyncSocket._upgrade_websocket)
    server = EngineServer(async_mode="aiohttp")
    assert issubclass(server._async["websocket"], engineio_aiohttp.WebSocket)


def test_socketio_builds_its_engineio_server_from_the_hook_and_passes_our_options():
    assert "self._engineio_server_class()(**engineio_options)" in source(socketio.base_server.BaseServer.__init__)
    assert socketio.AsyncServer._engineio_server_class(None) is engineio.AsyncServer
    sio = socketio.AsyncServer(async_mode="aiohttp")
    assert sio.manager is not None and hasattr(sio, "eio")


def test_socketio_manager_emit_is_what_the_mixin_replaces():
    params = list(inspect.signature(socketio.AsyncManager.emit).parameters)
    assert params[:8] == ["self", "event", "data", "namespace", "room", "skip_sid", "callback", "to"]
    assert "self.get_participants(namespace, room)" in source(socketio.AsyncManager.emit)
    assert "self.server._send_eio_packet(eio_sid, p)" in source(socketio.AsyncManager.emit)
    assert "def get_participants(self, namespace, room)" in source(socketio.base_manager.BaseManager)


def test_socketio_manager_rooms_layout_we_read():
    # realtime.py's `_release_rooms` reads a room's size from it instead of walking the room.
    assert "self.rooms = {}  # self.rooms[namespace][room][sio_sid] = eio_sid" in source(
        socketio.base_manager.BaseManager.__init__
    )
    assert "self.rooms[namespace][room] = bidict()" in source(socketio.base_manager.BaseManager.basic_enter_room)


def test_pubsub_managers_deliver_locally_through_the_mixin():
    assert "await super().emit(" in source(AsyncPubSubManager._handle_emit)

    class FastRedisManager(socketio.AsyncRedisManager, FastBroadcastMixin):
        pass

    mro = FastRedisManager.__mro__
    assert mro.index(AsyncPubSubManager) < mro.index(FastBroadcastMixin) < mro.index(socketio.AsyncManager)


def test_aiohttp_websocket_api_we_use():
    ws = aiohttp.web.WebSocketResponse(compress=False)
    assert ws.compress is False and ws.closed is False
    # Headers held back until the first write, which carries them (DirectWebSocket).
    assert ws._send_headers_immediately is True
    assert "if self._send_headers_immediately:" in source(aiohttp.web.StreamResponse._write_headers)
    assert "self._send_headers_with_payload(chunk, False)" in source(aiohttp.http_writer.StreamWriter.write)
    assert "def send_headers(self)" in source(aiohttp.http_writer.StreamWriter)
    assert "timeout" in inspect.signature(aiohttp.web.WebSocketResponse.receive).parameters
    assert isinstance(aiohttp.web.Request.transport, property)
