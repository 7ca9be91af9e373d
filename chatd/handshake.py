"""The Socket.IO handshake: the session cookie read, the socket's identity fixed, `welcome` sent after the CONNECT answer.

python-socketio runs on the same aiohttp app, so the Engine.IO handshake is an
ordinary aiohttp request that passes through aiohttp-session's middleware. The
connect handler takes that request from the socket's environ
(`environ["aiohttp.request"]`) and reads the session with
`sessions.read_session`, exactly as an HTTP handler does. The identity it finds
is fixed for the socket's lifetime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import socketio

from .endings import SessionEndings, session_room
from .metrics import Metrics
from .presence.published import Snapshot
from .rooms import Rooms, SocketState, person_room
from .sessions import read_session
from .sio.jsonhook import OrjsonForSocketIO
from .sio.server import ChatServer
from .storage import DEFAULT_ROOM, OUTAGE_RETRY_AFTER, Storage, StorageError

log = logging.getLogger("chatd.handshake")

Refused = socketio.exceptions.ConnectionRefusedError
NOBODY = Snapshot((b"[]",), 0)  # the welcome's `online` when the session is not in general


@dataclass(eq=False)
class Handshake:
    sio: ChatServer
    sockets: dict[str, SocketState]
    storage: Storage
    metrics: Metrics
    rooms: Rooms
    endings: SessionEndings
    undo: Callable[[str], Awaitable[None]]  # what a disconnect does: a refused socket gets no disconnect event

    def __post_init__(self) -> None:
        self.sio.eio.early_refusal = self.early_refusal
        self.sio.on_connected(self.connected)

    async def connect(self, sid: str, environ: dict, auth=None) -> None:
        """python-socketio's connect handler: accept, or refuse with a reason."""
        try:
            await self._connect(sid, environ)
        except Refused:
            raise
        except Exception as exc:
            # Refused with a reason rather than left without an answer; what the
            # handshake had done (rooms, presence, timer) is undone here.
            if isinstance(exc, StorageError):
                log.warning("storage is unreachable; refusing a handshake")
                refusal = ("unavailable", {"retry_after": OUTAGE_RETRY_AFTER})
            else:
                if not isinstance(exc, ConnectionError):  # a client gone mid-handshake needs no traceback
                    log.exception("a handshake failed")
                refusal = ("internal_error",)
            try:
                await self.undo(sid)
            except Exception:
                log.exception("could not undo a failed handshake")
            self.metrics.handshake_refused(refusal[0])
            raise Refused(*refusal) from None

    async def _connect(self, sid: str, environ: dict) -> None:
        session = await read_session(environ["aiohttp.request"])
        user = session.user
        if user is None:
            self.metrics.handshake_refused(session.rejected)
            raise Refused("unauthorized", {"reason": session.rejected})
        # Join the session's room first, then look at revocation again: a logout that
        # lands between reading the cookie and joining is then seen either here or by
        # the ending, which finds this socket in the room.
        await self.sio.enter_room(sid, session_room(user.sid))
        if await self.storage.is_revoked(user.sid):
            self.metrics.handshake_refused("revoked")
            raise Refused("unauthorized", {"reason": "revoked"})
        owner = user.author  # storage.owner_key
        state = self.sockets[sid] = SocketState(user=user, owner=owner)
        self.endings.watch_expiry(sid, state)
        # In the owner's room before its rooms are read: a join elsewhere meanwhile reaches it.
        await self.sio.enter_room(sid, person_room(owner))
        rooms = await self.storage.room_states(owner)
        history, online, room = [], NOBODY, None
        member = user.presence_member()  # once, not once per room: a session may be in 50
        for room_state in rooms:
            name = room_state["room"]
            if name == DEFAULT_ROOM:
                room = DEFAULT_ROOM
                history, online = await self.rooms.enter(sid, state, name)
            elif name not in state.rooms:
                await self.rooms.enter_quietly(sid, state, name, member)
        self.metrics.handshake_accepted()
        # Sent once python-socketio has answered the CONNECT (`connected`): a Socket.IO
        # client drops, or must buffer, an event that comes before that answer.
        welcome = {
            "id": user.member_id, **user.public(), "room": room, "history": history,
            "online_count": online.count, "rooms": rooms,
        }  # fmt: skip
        state.welcome = (welcome, online)

    async def connected(self, sid: str) -> None:
        """The socket's CONNECT answer has been sent: `welcome` goes now."""
        state = self.sockets.get(sid)
        if state is not None and state.welcome is not None:
            (welcome, online), state.welcome = state.welcome, None
            await self._send_welcome(sid, welcome, online)

    async def early_refusal(self, environ: dict) -> str | None:
        """The CONNECT_ERROR `connect` would give a websocket handshake, found before it starts
        (sio/engine.py answers it without an Engine.IO socket); None to connect as usual."""
        session = await read_session(environ["aiohttp.request"])
        if session.user is not None:
            return None
        self.metrics.handshake_refused(session.rejected)
        return self.sio.encoded_refusal("unauthorized", {"reason": session.rejected})

    async def _send_welcome(self, sid: str, welcome: dict, online: Snapshot) -> None:
        """Emit `welcome` with its `online` list spliced in as the JSON presence keeps.

        In a room of thousands that list is most of the packet (~60 bytes a
        member): it is neither parsed, encoded nor copied here. The packet
        (`2["welcome",{…}]`, namespace `/`) goes out as pieces of one frame, the
        list's pieces being slices of presence's cached bytes, so the 5,000th
        handshake costs about what the first does.
        """
        head = OrjsonForSocketIO.dumps(welcome).encode("utf-8")  # {"id":…,"history":[…],…}
        parts = (b'2["welcome",', memoryview(head)[:-1], b',"online":', *online.parts, b"}]")
        await self.sio.send_text(sid, parts)
