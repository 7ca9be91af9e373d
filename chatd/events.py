"""What a connected client may ask: `send chat`, `edit chat`, `delete chat`, `join`, `leave`, `history`,
`read`, `typing` (moderation.py adds the directory and moderation's events, and the checks these make).

Each handler takes the socket id and the event's payload and returns the ack
(`{"ok": true, …}`); it raises `EventError` for SPEC's error codes. The gate
in sio/server.py acks, or emits `chat_error` when the client gave no ack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import mentions
from .limits import ChatRateLimiter
from .metrics import Metrics
from .moderation import Moderation
from .rooms import Rooms, SocketState
from .sio.jsonhook import JsonText
from .sio.server import Handler
from .storage import MAX_ROOMS, ChangeRefused, Storage, TooManyRooms, direct_pair, is_direct, owner_key
from .validation import ID_MAX, EventError, parse_history, parse_message_ref, parse_read, parse_room, parse_send_chat

TYPING_EVERY = 2.0  # seconds: at most one `typing` per session per room this often
TYPING_MAX_ONLINE = 100  # nothing is relayed in a room with more sessions online
TYPING_REMEMBERED = 10_000  # throttle entries kept before the stale ones are swept


@dataclass(eq=False)
class ChatEvents:
    sockets: dict[str, SocketState]
    storage: Storage
    metrics: Metrics
    rooms: Rooms
    rate_limiter: ChatRateLimiter
    moderation: Moderation
    _typed: dict[tuple[str, str], float] = field(default_factory=dict, init=False)  # (member id, room) -> last relayed

    def table(self) -> dict[str, Handler]:
        """Event name -> handler: every event a client may send (anything else is ignored)."""
        return {
            "send chat": self.send_chat,
            "edit chat": self.edit_chat,
            "delete chat": self.delete_chat,
            "join": self.join,
            "leave": self.leave,
            "history": self.history,
            "read": self.read,
            "typing": self.typing,
            **self.moderation.table(),
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
        # A banned session is not in the room (not_in_room): only the direct-room rule and a mute.
        self.moderation.check_direct(self.sockets[sid], command.room)
        state = self._joined(sid, command.room)
        await self.moderation.may_send(state, command.room)
        user = state.user
        await self._take_token(user.sid)
        named = await mentions.resolve(self.storage, command.msg)
        message = await self.storage.add_message(
            command.room, user.name, user.account, command.msg, time.time(),
            author=state.owner, client_id=command.client_id, mentions=named,
        )  # fmt: skip
        if message.get("duplicate"):  # a resend of a kept client_id: the first send's ack, nothing else
            return {"ok": True, "id": message["id"], "rev": message["rev"]}
        self.metrics.message_stored()
        await self.rooms.publish_change("new", message)
        # Storing it moved the sender's marker to it; it was the room's last message then.
        moved = {"room": command.room, "last_id": message["id"], "read_id": message["id"], "unread": 0, "mentions": 0}
        await self.rooms.marker_moved(state.owner, moved, sid)
        if is_direct(command.room):  # back into the other account's rooms, if it had left
            await self._add_other(state, command.room)
        return {"ok": True, "id": message["id"], "rev": message["rev"]}

    async def _add_other(self, state: SocketState, room: str) -> None:
        """A direct room is in both accounts' rooms: the other's sockets, everywhere, are told."""
        other = owner_key(_other_account(state, room), "")
        try:
            added = await self.storage.join_room(other, room)
        except TooManyRooms:  # it is there for them to join once they have room
            return
        if added:
            await self.rooms.person_changed(other, "joined", room, "")

    async def edit_chat(self, sid: str, payload) -> dict:
        command = parse_message_ref(payload, with_msg=True)
        state = self._joined(sid, command.room)
        await self.moderation.may_send(state, command.room)
        await self._take_token(state.user.sid)
        named = await mentions.resolve(self.storage, command.msg)  # an edit recomputes them (SPEC)
        message = await self._change(self.storage.edit_message, command, state.owner, command.msg, time.time(), named)
        await self.rooms.publish_change("edited", message)
        return {"ok": True, "rev": message["rev"]}

    async def delete_chat(self, sid: str, payload) -> dict:
        command = parse_message_ref(payload, with_msg=False)
        state = self._joined(sid, command.room)
        try:
            deleted = await self._change(self.storage.delete_message, command, state.owner, any_author=False)
        except EventError as refused:  # not its author: a moderator may still delete it
            if refused.code != "forbidden" or not await self.moderation.moderates(state, command.room):
                raise
            deleted = await self._change(self.storage.delete_message, command, state.owner, any_author=True)
            await self.moderation.deleted(state, command.room, command.id)
        await self.rooms.publish_change("deleted", deleted)
        return {"ok": True, "rev": deleted["rev"]}

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
        await self.moderation.admit(state, room)
        if is_direct(room) and room not in state.rooms:
            await self._check_other(state, room)
        if room in state.rooms:  # already live here: a history up to what it was sent
            history, online = await self.rooms.again(state, room)
        else:
            try:
                added = await self.storage.join_room(state.owner, room)
            except TooManyRooms:
                raise EventError("too_many_rooms", f"You can be in at most {MAX_ROOMS} rooms.") from None
            history, online = await self.rooms.enter(sid, state, room)
            if added:  # the owner's other sockets, on every process, enter it too
                await self.rooms.person_changed(state.owner, "joined", room, sid)
            await self.moderation.joined(state, room)
            if is_direct(room):
                await self._add_other(state, room)
        found = await self.storage.room_states(state.owner, room)
        room_state = found[0] if found else {"last_id": 0, "read_id": 0, "unread": 0, "mentions": 0}
        # The list goes into the ack as the text presence keeps, not re-encoded.
        return {
            "ok": True, "room": room, "topic": await self.moderation.topic_of(room), "history": history,
            "online": JsonText(online.text), "online_count": online.count,
            **{k: v for k, v in room_state.items() if k != "room"},
        }  # fmt: skip

    async def _check_other(self, state: SocketState, room: str) -> None:
        """Joining a direct room: the other account exists."""
        other = _other_account(state, room)
        if await self.storage.find_account(other) is None:
            raise EventError("not_found", f"No account '{other}'.")

    async def leave(self, sid: str, payload) -> dict:
        room = parse_room(payload)
        state = self._joined(sid, room)
        await self.storage.leave_room(state.owner, room)
        await self.rooms.leave(sid, state, room)
        await self.rooms.person_changed(state.owner, "left", room, sid)
        return {"ok": True}

    async def history(self, sid: str, payload) -> dict:
        query = parse_history(payload)
        await self.moderation.admit(self.sockets[sid], query.room)
        self._joined(sid, query.room)
        # The rev first: the messages read after it are at least that new, so a client
        # that goes on `since` this rev misses nothing (at worst it sees a change twice).
        _, rev = await self.storage.revision(query.room)
        messages = await self.storage.history(
            query.room, before=query.before, after=query.after, since=query.since, limit=query.limit
        )
        return {"ok": True, "messages": messages, "rev": rev}

    async def read(self, sid: str, payload) -> dict:
        room, message_id = parse_read(payload)
        state = self._joined(sid, room)
        marked = await self.storage.mark_read(state.owner, room, message_id)
        if marked is None:  # left on another process a moment ago
            raise EventError("not_in_room", f"Join '{room}' first.")
        room_state, moved = marked
        if moved:
            await self.rooms.marker_moved(state.owner, room_state, sid)
        return {"ok": True, **room_state}

    async def typing(self, sid: str, payload) -> dict:
        """Relayed to the room's other sessions, at most once per session per room every
        TYPING_EVERY seconds (counted on each process), never in a crowded room."""
        room = parse_room(payload)
        state = self._joined(sid, room)
        member = state.user.presence_member()
        key, now = (member["id"], room), time.monotonic()
        if now - self._typed.get(key, -TYPING_EVERY) < TYPING_EVERY:
            return {"ok": True}
        if self.rooms.presence.online(room) > TYPING_MAX_ONLINE:
            return {"ok": True}
        if len(self._typed) >= TYPING_REMEMBERED:  # bounded: forget what no longer throttles anything
            self._typed = {k: t for k, t in self._typed.items() if now - t < TYPING_EVERY}
        self._typed[key] = now
        await self.rooms.typing(room, member)
        return {"ok": True}


def _other_account(state: SocketState, room: str) -> str:
    """The account of a direct room that is not the socket's own."""
    return next(name for name in direct_pair(room) if owner_key(name, "") != state.owner)
