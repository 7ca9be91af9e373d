"""Presence kept in this process.

Per room: the current sockets of each session, and the *published* state — the
members every socket of the room knows about — kept sorted (SPEC's order) in
two parallel lists, with each member's JSON made once. The published list's
JSON is joined at most once per published change and reused by every snapshot
until the next one, so a handshake into a room of thousands copies text
instead of encoding thousands of members.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left

import orjson

from . import Member, Presence, Publish, sort_key


class _Published:
    """A room's published members, sorted, with their JSON."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []  # sort_key of each member, sorted
        self.fragments: list[str] = []  # each member's JSON, in the same order
        self.ids: set[str] = set()
        self._encoded: str | None = None
        self._offsets: list[int] | None = None

    def add(self, member: Member) -> None:
        key = sort_key(member)
        index = bisect_left(self.keys, key)
        self.keys.insert(index, key)
        self.fragments.insert(index, _json(member))
        self.ids.add(member["id"])
        self._encoded = self._offsets = None

    def discard(self, member: Member) -> None:
        key = sort_key(member)
        index = bisect_left(self.keys, key)
        if index < len(self.keys) and self.keys[index] == key:
            del self.keys[index], self.fragments[index]
            self.ids.discard(member["id"])
            self._encoded = self._offsets = None

    @property
    def encoded(self) -> str:
        if self._encoded is None:
            self._encoded = "[" + ",".join(self.fragments) + "]"
        return self._encoded

    def with_member(self, member: Member) -> str:
        """The JSON list with `member` in its place; the cached text when it is there already."""
        if member["id"] in self.ids:
            return self.encoded
        fragment = _json(member)
        index = bisect_left(self.keys, sort_key(member))
        if not self.keys:
            return "[" + fragment + "]"
        encoded = self.encoded
        if index == len(self.keys):
            return "".join((encoded[:-1], ",", fragment, "]"))
        if self._offsets is None:
            # Where each member's JSON starts: after "[" and each earlier member and its ",".
            self._offsets = list(itertools.accumulate((len(f) + 1 for f in self.fragments), initial=1))
        at = self._offsets[index]
        return "".join((encoded[:at], fragment, ",", encoded[at:]))


def _json(member: Member) -> str:
    return orjson.dumps(member).decode("utf-8")


class _Room:
    def __init__(self) -> None:
        self.sockets: dict[str, set[str]] = {}  # member id -> its sockets in the room, now
        self.published = _Published()


class MemoryPresence(Presence):
    def __init__(self, publish: Publish) -> None:
        super().__init__(publish)
        self._rooms: dict[str, _Room] = {}

    async def snapshot(self, room: str, member: Member) -> str:
        state = self._rooms.get(room)
        published = state.published if state is not None else _Published()
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
        joins, leaves = [], []
        published = state.published
        for member_id, member in touched.items():
            online, shown = member_id in state.sockets, member_id in published.ids
            if online and not shown:
                published.add(member)
                joins.append(member)
            elif shown and not online:
                published.discard(member)
                leaves.append(member)
        if not state.sockets and not published.ids:
            del self._rooms[room]
        return sorted(joins, key=sort_key), sorted(leaves, key=sort_key)

    def _size(self, room: str) -> int:
        state = self._rooms.get(room)
        return len(state.sockets) if state is not None else 0
