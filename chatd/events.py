"""What a connected client may ask: `send chat`, `edit chat`, `delete chat`, `join`, `leave`, `history`.

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
from .storage import ChangeRefused, Storage
from .validation import ID_MAX, EventError, parse_history, parse_message_ref, parse_room, parse_send_chat

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
        return {
            "send chat": self.send_chat,
            "edit chat": self.edit_chat,
            "delete chat": self.delete_chat,
            "join": self.join,
            "leave": self.leave,
            "history": self.history,
        }

    def _joined(self, sid: str, room: str) -> SocketState:
        state = self.sockets[sid]
        if room not in state.rooms:
            raise EventError("not_in_room", f"Join '{room}' first.")
        return state

    async def _take_token(self, session_id: str) -> None:
        """`send chat` and `edit chat` draw on the session's chat limit."""
        wait = await self.rate_limiter.take(session_id)
        if wait > 0:
            raise EventError(
                "rate_limited", "You are sending too fast; wait a moment.", retry_after=round(wait + 0.0005, 3)
            )

    async def send_chat(self, sid: str, payload) -> dict:
        command = parse_send_chat(payload)
        user = self._joined(sid, command.room).user
        await self._take_token(user.sid)
        message = await self.storage.add_message(
            command.room, user.name, user.account, command.msg, time.time(), author=user.author, client_id=command.client_id
        )
        if message.get("duplicate"):  # a resend of a kept client_id: the first send's ack, nothing else
            return {"ok": True, "id": message["id"], "rev": message["rev"]}
        self.metrics.message_stored()
        await self.rooms.publish_change("new", message)
        return {"ok": True, "id": message["id"], "rev": message["rev"]}

    async def edit_chat(self, sid: str, payload) -> dict:
        command = parse_message_ref(payload, with_msg=True)
        user = self._joined(sid, command.room).user
        await self._take_token(user.sid)
        message = await self._change(self.storage.edit_message, command, user.author, command.msg, time.time())
        await self.rooms.publish_change("edited", message)
        return {"ok": True, "rev": message["rev"]}

    async def delete_chat(self, sid: str, payload) -> dict:
        command = parse_message_ref(payload, with_msg=False)
        state = self._joined(sid, command.room)
        deleted = await self._change(
            self.storage.delete_message, command, state.user.author, any_author=await self.moderates(state, command.room)
        )
        await self.rooms.publish_change("deleted", deleted)
        return {"ok": True, "rev": deleted["rev"]}

    async def moderates(self, state: SocketState, room: str) -> bool:
        """Whether the socket's session may delete anyone's message in `room` (SPEC: the room's
        moderators). The hook for moderation (issue 22); until then only authors delete."""
        return False

    @staticmethod
    async def _change(apply, command, *args, **kwargs) -> dict:
        if not 1 <= command.id <= ID_MAX:  # no such message can exist
            raise EventError("not_found", "There is no such message in this room.")
        try:
            return await apply(command.room, command.id, *args, **kwargs)
        except ChangeRefused as refused:
            if refused.code == "forbidden":
                raise EventError("forbidden", "Only its author may change this message.") from None
            raise EventError("not_found", "There is no such message in this room.") from None

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
        # The rev first: the messages read after it are at least that new, so a client
        # that goes on `since` this rev misses nothing (at worst it sees a change twice).
        _, rev = await self.storage.revision(query.room)
        messages = await self.storage.history(
            query.room, before=query.before, after=query.after, since=query.since, limit=query.limit
        )
        return {"ok": True, "messages": messages, "rev": rev}
