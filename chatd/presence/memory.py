"""Presence kept in this process.

Per room: the current sockets of each session, and the *published* state — the
members every socket of the room knows about (`published.PublishedList`: kept
sorted, its JSON made once per published change and reused by every snapshot).
"""

from __future__ import annotations

from . import Member, Presence, Publish
from .published import PublishedList, Snapshot


class _Room:
    def __init__(self) -> None:
        self.sockets: dict[str, set[str]] = {}  # member id -> its sockets in the room, now
        self.published = PublishedList()


class MemoryPresence(Presence):
    def __init__(self, publish: Publish) -> None:
        super().__init__(publish)
        self._rooms: dict[str, _Room] = {}

    async def snapshot(self, room: str, member: Member) -> Snapshot:
        state = self._rooms.get(room)
        published = state.published if state is not None else PublishedList()
        return published.with_member(member)

    async def _add(self, room: str, socket_id: str, member: Member) -> bool:
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        sockets = state.sockets.get(member["id"])
        if sockets is None:
            state.sockets[member["id"]] = {socket_id}
            return True
        sockets.add(socket_id)
        return False

    async def _remove(self, room: str, socket_id: str, member: Member) -> bool:
        state = self._rooms.get(room)
        sockets = state.sockets.get(member["id"]) if state is not None else None
        if sockets is None or socket_id not in sockets:
            return False
        sockets.discard(socket_id)
        if sockets:
            return False
        del state.sockets[member["id"]]
        return True

    async def _settle(self, room: str, touched: dict[str, Member]) -> tuple[list[Member], list[Member]]:
        state = self._rooms.get(room)
        if state is None:
            return [], []
        changes = state.published.settle(touched, lambda id_: touched[id_] if id_ in state.sockets else None)
        if not state.sockets and not state.published.members:
            del self._rooms[room]
        return changes

    def _published_count(self, room: str) -> int:
        state = self._rooms.get(room)
        return len(state.published.members) if state is not None else 0

    def _size(self, room: str) -> int:
        state = self._rooms.get(room)
        return len(state.sockets) if state is not None else 0
