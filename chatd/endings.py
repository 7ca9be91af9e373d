"""Session endings: logout, login and expiry end every socket of a session, on every process.

All sockets of one session are in the Socket.IO room `session:<sha256 of sid>`;
with several processes an ending is a control message every process acts on
for its own sockets (sio/managers.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from .rooms import SocketState
from .sio.managers import RedisClientManager
from .sio.server import ChatServer
from .tasks import TaskOwner

# A session's socket whose client ignores `session_ended` has its transport closed this much later.
SESSION_END_GRACE_SECONDS = 0.5
# How long an ending waits for a socket still in its handshake to finish it.
HANDSHAKE_WAIT_SECONDS = 5.0


def session_room(sid: str) -> str:
    # A digest, not the sid: session endings name this room to every process over Redis.
    return "session:" + hashlib.sha256(sid.encode("utf-8")).hexdigest()


class SessionEndings:
    def __init__(
        self, sio: ChatServer, sockets: dict[str, SocketState], tasks: TaskOwner, cluster: RedisClientManager | None
    ) -> None:
        self.sio = sio
        self.sockets = sockets
        self.tasks = tasks
        self.cluster = cluster
        if cluster is not None:
            cluster.on_control("end_session", self.end_local_session)

    async def end_session(self, session_id: str, reason: str) -> None:
        """End a session's sockets on every process (the caller has revoked it already)."""
        room = session_room(session_id)
        if self.cluster is not None:
            await self.cluster.publish_control("end_session", room, reason)
        else:
            await self.end_local_session(room, reason)

    async def end_local_session(self, room: str, reason: str) -> None:
        """Tell this process's sockets in a session's room that it ended, then disconnect them.

        A socket still in its handshake (in the session's room, connect handler not
        done) is ended as soon as it is connected; one whose client ignores the
        disconnect has its transport closed by the server a moment later.
        """
        for sid, eio_sid in list(self.sio.manager.get_participants("/", room)):
            if self.sio.manager.is_connected(sid, "/"):
                await self._end_socket(sid, eio_sid, reason)
            else:
                self.tasks.spawn(self._end_after_handshake(sid, eio_sid, reason))

    async def _end_after_handshake(self, sid: str, eio_sid: str, reason: str) -> None:
        deadline = time.monotonic() + HANDSHAKE_WAIT_SECONDS
        while self.sio.manager.is_pre_connected(sid, "/") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.sio.manager.is_connected(sid, "/"):  # else the handshake was refused or dropped
            await self._end_socket(sid, eio_sid, reason)

    async def _end_socket(self, sid: str, eio_sid: str, reason: str) -> None:
        await self.sio.emit("session_ended", {"reason": reason}, to=sid, ignore_queue=True)
        await self.sio.disconnect(sid, ignore_queue=True)
        self.tasks.later(SESSION_END_GRACE_SECONDS, self.sio.eio.close_transport, eio_sid)

    # -- expiry, enforced on live sockets ---------------------------------------------

    def watch_expiry(self, sid: str, state: SocketState) -> None:
        delay = max(0.0, state.user.expires_at - time.time())
        state.expiry = self.tasks.later(delay, self._expire, sid)

    async def _expire(self, sid: str) -> None:
        eio_sid = self.sio.eio_sid(sid)
        if sid in self.sockets and eio_sid is not None:
            await self._end_socket(sid, eio_sid, "expired")

    @staticmethod
    def forget(state: SocketState) -> None:
        if state.expiry is not None:
            state.expiry.cancel()

