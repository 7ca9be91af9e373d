"""What a connected client may ask: `send chat`, `join`, `leave`, `history`.

Each handler takes the socket id and the event's payload and returns the ack
(`{"ok": true, …}`); it raises `EventError` for SPEC's error codes. The gate
in sio/server.py acks, or emits `chat_error` when the client gave no ack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .limits import ChatRateLimiter
from .metrics import Metrics
from .rooms import Rooms, SocketState
from .sio.jsonhook import JsonText
from .sio.server import Handler
from .storage import Storage
from .validation import EventError, parse_history, parse_room, parse_send_chat

MAX_ROOMS_PER_SOCKET = 20


@dataclass(eq=False)
class ChatEvents:
    sockets: dict[str, SocketState]
    storage: Storage
    metrics: Metrics
    rooms: Rooms
    rate_limiter: ChatRateLimiter

    def table(self) -> dict[str, Handler]:
        """Event name -> handler: every event a client may send (anything else is ignored)."""
        return {"send chat": self.send_chat, "join": self.join, "leave": self.leave, "history": self.history}

    def _joined(self, sid: str, room: str) -> SocketState:
        state = self.sockets[sid]
        if room not in state.rooms:
            raise EventError("not_in_room", f"Join '{room}' first.")
        return state

    async def send_chat(self, sid: str, payload) -> dict:
        command = parse_send_chat(payload)
        user = self._joined(sid, command.room).user
        wait = await self.rate_limiter.take(user.sid)
        if wait > 0:
            raise EventError(
                "rate_limited", "You are sending too fast; wait a moment.", retry_after=round(wait + 0.0005, 3)
            )
        message = await self.storage.add_message(command.room, user.name, user.account, command.msg, time.time())
        self.metrics.message_stored()
        await self.rooms.publish_chat(message)
        return {"ok": True, "id": message["id"]}

    async def join(self, sid: str, payload) -> dict:
        room = parse_room(payload)
        state = self.sockets[sid]
        if room in state.rooms:  # already live here: a history up to what it was sent
            history, online = await self.rooms.again(state, room)
        elif len(state.rooms) >= MAX_ROOMS_PER_SOCKET:
            raise EventError("too_many_rooms", f"A connection can be in at most {MAX_ROOMS_PER_SOCKET} rooms.")
        else:
            history, online = await self.rooms.enter(sid, state, room)
        # The list goes into the ack as the text presence keeps, not re-encoded.
        return {"ok": True, "room": room, "history": history, "online": JsonText(online.text)}

    async def leave(self, sid: str, payload) -> dict:
        room = parse_room(payload)
        state = self._joined(sid, room)
        await self.rooms.leave(sid, state, room)
        return {"ok": True}

    async def history(self, sid: str, payload) -> dict:
        query = parse_history(payload)
        self._joined(sid, query.room)
        messages = await self.storage.history(query.room, before=query.before, after=query.after, limit=query.limit)
        return {"ok": True, "messages": messages}
