"""Moderation, the room directory and direct rooms: `rooms`, `topic`, `moderator`, `mute`,
`kick`, `ban`, and the checks `join`, `history` and `send chat` make (events.py).

Roles, topics, mutes, bans and the audit log live in storage, so every process
sees an action as soon as it is committed: the checks read storage at the moment
they run. A kick or a ban also removes the room from the target's rooms in
storage and sends the `rooms` control message (rooms.py), which makes every
process take the target's sockets out of the room at once, with `left`.

A room's moderators, by rank: operators (`--operator`) 3, the owner (the first
account that joined a public room) 2, named moderators 1. Nobody acts on an
operator, and a moderator acts only on someone of a lower rank. Direct rooms
have no moderators.
"""

from __future__ import annotations

import math
import time

from .accounts import USERNAME_RE
from .rooms import Rooms, SocketState, chat_room
from .sio.server import Handler
from .storage import DEFAULT_ROOM, Storage, direct_pair, is_direct
from .validation import (
    MEMBER_ID_RE,
    EventError,
    Target,
    parse_ban,
    parse_directory,
    parse_moderator,
    parse_mute,
    parse_target,
    parse_topic,
)

OPERATOR, OWNER, MODERATOR, NOBODY = 3, 2, 1, 0
DIRECTORY_NAME = set("abcdefghijklmnopqrstuvwxyz0123456789-")  # what a public room's name is made of


class Moderation:
    def __init__(self, sockets: dict[str, SocketState], storage: Storage, rooms: Rooms, operators: tuple[str, ...]):
        self.sockets = sockets
        self.storage = storage
        self.rooms = rooms
        self.operators = frozenset(operators)

    def table(self) -> dict[str, Handler]:
        return {
            "rooms": self.directory,
            "topic": self.topic,
            "moderator": self.moderator,
            "mute": self.mute,
            "kick": self.kick,
            "ban": self.ban,
        }

    # -- checks for join, history and send chat ---------------------------------------

    @staticmethod
    def check_direct(state: SocketState, room: str) -> None:
        """A direct room is its two accounts' only (`forbidden`)."""
        if is_direct(room):
            account = state.user.account
            if account is None or account.lower() not in direct_pair(room):
                raise EventError("forbidden", "This direct room is between two other accounts.")

    async def admit(self, state: SocketState, room: str) -> None:
        """May this session see the room at all (`join`, `history`): a direct room only its two
        accounts (`forbidden`), a public room everybody it does not ban (`banned`)."""
        self.check_direct(state, room)
        if is_direct(room):
            return
        _, banned = await self.storage.sanction(room, state.owner)
        if banned:
            raise EventError("banned", f"You are banned from '{room}'.")

    async def may_send(self, state: SocketState, room: str) -> None:
        """`send chat`, `edit chat`: `muted`, with `retry_after`, while the session is muted in
        the room; a banned one is out of it already, or about to be."""
        if is_direct(room):
            return
        muted_until, banned = await self.storage.sanction(room, state.owner)
        if banned:  # its sockets are leaving the room on every process (a control message away)
            raise EventError("not_in_room", f"Join '{room}' first.")
        left = muted_until - time.time()
        if left > 0:
            raise EventError("muted", "You are muted in this room.", retry_after=math.ceil(left))

    async def joined(self, state: SocketState, room: str) -> None:
        """After a join: the first account in a public room owns it."""
        if state.user.account is not None and not is_direct(room) and room != DEFAULT_ROOM:
            await self.storage.claim_room(room, state.user.account.lower())

    async def moderates(self, state: SocketState, room: str) -> bool:
        """A moderator of the room (`delete chat` of anyone's message); nobody in a direct room."""
        return not is_direct(room) and await self._rank(room, state.user.account) >= MODERATOR

    async def deleted(self, state: SocketState, room: str, message_id: int) -> None:
        """A moderator deleted somebody else's message: the audit log keeps its id, never its text."""
        await self.storage.record(state.user.account, "delete", None, room, message_id=message_id)

    async def topic_of(self, room: str) -> str:
        if is_direct(room):
            return ""
        _, topic, _ = await self.storage.room_info(room)
        return topic

    # -- ranks ---------------------------------------------------------------------

    async def _rank(self, room: str, account: str | None) -> int:
        if account is None:
            return NOBODY
        key = account.lower()
        if key in self.operators:
            return OPERATOR
        owner, _, named = await self.storage.room_info(room)
        return OWNER if key == owner else MODERATOR if key in named else NOBODY

    async def _moderator(self, sid: str, room: str, least: int = MODERATOR) -> tuple[SocketState, int]:
        """The acting session and its rank in the room; `forbidden` below `least`."""
        state = self.sockets[sid]
        rank = NOBODY if is_direct(room) else await self._rank(room, state.user.account)
        if rank < least:
            raise EventError("forbidden", "You do not moderate this room.")
        return state, rank

    async def _target(self, target: Target, rank: int) -> tuple[str, str, str | None]:
        """The target's owner key, how the audit log names it, and its account (None: a guest);
        `not_found` if unknown, `forbidden` if it outranks the actor (or is an operator)."""
        if target.username is not None:
            valid = USERNAME_RE.fullmatch(target.username)
            account = await self.storage.find_account(target.username) if valid else None
            if account is None:
                raise EventError("not_found", f"No account '{target.username}'.")
            owner, named, key = "a:" + account.username.lower(), account.username, account.username.lower()
        else:
            owner = "s:" + target.member
            if not MEMBER_ID_RE.fullmatch(target.member) or not await self.storage.owner_known(owner):
                raise EventError("not_found", "No such member.")
            named, key = "guest " + target.member, None
        their = await self._rank(target.room, key)
        if their == OPERATOR or their >= rank:
            raise EventError("forbidden", "You cannot act on another moderator of this room.")
        return owner, named, key

    # -- events ----------------------------------------------------------------------

    async def directory(self, sid: str, payload) -> dict:
        query, limit = parse_directory(payload)
        state = self.sockets[sid]
        if not set(query) <= DIRECTORY_NAME:  # no public room's name holds anything else
            return {"ok": True, "rooms": []}
        rows = await self.storage.directory(state.owner, query, limit)
        for row in rows:
            row["online"] = self.rooms.presence.online(row["room"])
        return {"ok": True, "rooms": rows}

    async def topic(self, sid: str, payload) -> dict:
        room, topic = parse_topic(payload)
        if room not in self.sockets[sid].rooms:
            raise EventError("not_in_room", f"Join '{room}' first.")
        state, _ = await self._moderator(sid, room)
        await self.storage.set_topic(room, topic)
        await self.storage.record(state.user.account, "topic", None, room)
        # Through the client manager: every process's sockets in the room.
        await self.rooms.sio.emit("room updated", {"room": room, "topic": topic}, room=chat_room(room))
        return {"ok": True}

    async def moderator(self, sid: str, payload) -> dict:
        room, username, on = parse_moderator(payload)
        state, rank = await self._moderator(sid, room, least=OWNER)
        _, named, key = await self._target(Target(room, None, username), rank)
        await self.storage.set_moderator(room, key, on)
        await self.storage.record(state.user.account, "moderator", named, room, detail="on" if on else "off")
        return {"ok": True}

    async def mute(self, sid: str, payload) -> dict:
        target, seconds = parse_mute(payload)
        state, rank = await self._moderator(sid, target.room)
        owner, named, _ = await self._target(target, rank)
        await self.storage.set_mute(target.room, owner, time.time() + seconds if seconds else 0)
        await self.storage.record(state.user.account, "mute", named, target.room, detail=f"{seconds}s")
        return {"ok": True}

    async def kick(self, sid: str, payload) -> dict:
        target = parse_target(payload)
        state, rank = await self._moderator(sid, target.room)
        owner, named, _ = await self._target(target, rank)
        await self._remove(owner, target.room, "kicked")
        await self.storage.record(state.user.account, "kick", named, target.room)
        return {"ok": True}

    async def ban(self, sid: str, payload) -> dict:
        target, on = parse_ban(payload)
        state, rank = await self._moderator(sid, target.room)
        owner, named, _ = await self._target(target, rank)
        await self.storage.set_ban(target.room, owner, on)  # before the removal: no join slips in between
        if on:
            await self._remove(owner, target.room, "banned")
        await self.storage.record(state.user.account, "ban" if on else "unban", named, target.room)
        return {"ok": True}

    async def _remove(self, owner: str, room: str, reason: str) -> None:
        """The room leaves the target's rooms; its sockets on every process leave it, told `left`."""
        await self.storage.leave_room(owner, room)
        await self.rooms.person_changed(owner, "left", room, "", reason)
