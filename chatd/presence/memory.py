"""Presence kept in this process."""

from __future__ import annotations

from ..sessions import Identity
from . import Presence, sort_members


class MemoryPresence(Presence):
    def __init__(self) -> None:
        # room -> session id -> (member, socket ids of that session in the room)
        self._rooms: dict[str, dict[str, tuple[dict, set[str]]]] = {}

    async def join(self, room: str, socket_id: str, user: Identity) -> bool:
        sessions = self._rooms.setdefault(room, {})
        entry = sessions.get(user.sid)
        if entry is None:
            sessions[user.sid] = (user.member(), {socket_id})
            return True
        entry[1].add(socket_id)
        return False

    async def leave(self, room: str, socket_id: str, user: Identity) -> bool:
        sessions = self._rooms.get(room, {})
        entry = sessions.get(user.sid)
        if entry is None or socket_id not in entry[1]:
            return False
        entry[1].discard(socket_id)
        if entry[1]:
            return False
        del sessions[user.sid]
        if not sessions:
            del self._rooms[room]
        return True

    async def members(self, room: str) -> list[dict]:
        return sort_members([member for member, _ in self._rooms.get(room, {}).values()])
