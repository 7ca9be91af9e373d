"""The Socket.IO side, tied together: one object that owns the server and its parts.

- `sio/` — python-socketio and python-engineio as chatd serves them (the only
  code that touches their internals).
- `handshake.py` — the cookie read at connect, `welcome`.
- `rooms.py` — rooms and presence on this process, `new chat` fan-out in order.
- `events.py` — the events a client may send.
- `endings.py` — sessions that end (logout, login, expiry) end their sockets.
"""

from __future__ import annotations

from typing import Callable

from aiohttp import web

from .endings import SessionEndings
from .events import ChatEvents
from .handshake import Handshake
from .limits import ChatRateLimiter
from .metrics import Metrics
from .moderation import Moderation
from .presence import Presence, Publish
from .rooms import Rooms, SocketState
from .sio.managers import LocalManager, RedisClientManager
from .sio.server import ChatServer
from .storage import Storage
from .tasks import TaskOwner

MAX_FRAME_BYTES = 64 * 1024  # SPEC: larger Engine.IO frames are refused by the transport


class Realtime:
    def __init__(
        self,
        *,
        storage: Storage,
        presence: Callable[[Publish], Presence],
        rate_limiter: ChatRateLimiter,
        origin_allowed: Callable[[str | None, web.Request], bool],
        metrics: Metrics | None = None,
        client_manager: RedisClientManager | None = None,
        websocket_compression: bool = False,
        operators: tuple[str, ...] = (),
    ) -> None:
        self.metrics = metrics or Metrics()
        self.tasks = TaskOwner("realtime")
        self.sockets: dict[str, SocketState] = {}  # this process's connected sockets
        self.sio = ChatServer(
            async_mode="aiohttp",
            # Either way each socket's rooms are indexed: disconnect storms cost each socket's rooms, not all rooms.
            client_manager=client_manager or LocalManager(),
            max_http_buffer_size=MAX_FRAME_BYTES,
            # A callable, never []: an empty list would switch engine.io's origin check off.
            cors_allowed_origins=lambda origin, environ: origin_allowed(origin, environ["aiohttp.request"]),
            cors_credentials=True,
            metrics=self.metrics,
            websocket_compression=websocket_compression,  # permessage-deflate only when asked for
        )
        self.rooms = Rooms(self.sio, self.sockets, storage, presence, client_manager)
        self.endings = SessionEndings(self.sio, self.sockets, self.tasks, client_manager)
        self.handshake = Handshake(self.sio, self.sockets, storage, self.metrics, self.rooms, self.endings, self.disconnect)
        self.moderation = Moderation(self.sockets, storage, self.rooms, operators)
        self.events = ChatEvents(self.sockets, storage, self.metrics, self.rooms, rate_limiter, self.moderation)
        self.sio.on("connect", self.handshake.connect)
        self.sio.on("disconnect", self.disconnect)
        self.sio.events.update(self.events.table())

    @property
    def presence(self) -> Presence:
        return self.rooms.presence

    def attach(self, app: web.Application) -> None:
        self.sio.attach(app, socketio_path="socket.io")

    async def disconnect(self, sid: str, reason=None) -> None:
        state = self.sockets.pop(sid, None)
        if state is not None:
            self.endings.forget(state)
            await self.rooms.leave_all(sid, state)

    async def end_session(self, session_id: str, reason: str) -> None:
        await self.endings.end_session(session_id, reason)

    def online_counts(self) -> tuple[int, int, int]:
        """For metrics: sockets, rooms with a socket, and sessions with a socket, on this process."""
        states = self.sockets.values()
        rooms = set().union(*(state.rooms for state in states))
        return len(self.sockets), len(rooms), len({state.user.sid for state in states})

    async def close_all(self) -> None:
        """On shutdown: close every transport, so clients see the server go and reconnect later.

        An Engine.IO close, not a Socket.IO disconnect: clients treat the former as a
        dropped connection and reconnect by themselves (sio/engine.py `close_transport`).
        """
        await self.sio.eio.close_all()
        await self.tasks.close()
        await self.rooms.close()
