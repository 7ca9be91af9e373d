"""Who is online in each room: one member per session, however many sockets it has.

`Presence` is the interface; `MemoryPresence` keeps it in this process. A
Redis version will share it across processes. It is kept apart from
python-socketio's own room tables on purpose: those only know local sockets.
"""

from __future__ import annotations

import abc

from .sessions import Identity


def sort_members(members: list[dict]) -> list[dict]:
    return sorted(members, key=lambda m: (m["name"].casefold(), m["name"]))


class Presence(abc.ABC):
    @abc.abstractmethod
    async def join(self, room: str, socket_id: str, user: Identity) -> bool:
        """Add a socket; True when the room's member list changed."""

    @abc.abstractmethod
    async def leave(self, room: str, socket_id: str, user: Identity) -> bool:
        """Remove a socket; True when the room's member list changed."""

    @abc.abstractmethod
    async def members(self, room: str) -> list[dict]:
        """Members of a room (SPEC's Member), sorted by name without regard to case."""


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
