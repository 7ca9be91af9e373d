"""Who is online in each room: one member per session, however many sockets it has.

`Presence` is the interface; `memory.MemoryPresence` keeps it in this process. A
Redis version will share it across processes. It is kept apart from
python-socketio's own room tables on purpose: those only know local sockets.
"""

from __future__ import annotations

import abc

from ..sessions import Identity


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
