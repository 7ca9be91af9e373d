"""A room's *published* members — what every socket of the room holds — kept ready to send.

Sorted in SPEC's order in two parallel lists, with each member's JSON made
once. The list's JSON is joined at most once per published change and reused
by every snapshot until the next one, so a handshake into a room of thousands
neither encodes thousands of members nor copies their text: a snapshot is the
cached bytes in pieces (`Snapshot`), written to the socket as they are.
Shared by every backend.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from typing import Callable, Iterable

import orjson

from . import Member, sort_key


SNAPSHOT_LIMIT = 500  # SPEC: a snapshot lists at most the first 500 members


class Snapshot:
    """A room's online list as JSON, in pieces: slices of the cached list and the caller's entry;
    `count` is how many are online in all (the list stops at SNAPSHOT_LIMIT)."""

    __slots__ = ("parts", "count")

    def __init__(self, parts: tuple[bytes | memoryview, ...], count: int) -> None:
        self.parts = parts
        self.count = count

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    @property
    def text(self) -> str:
        return b"".join(self.parts).decode("utf-8")


class PublishedList:
    """A room's published members, sorted, with their JSON."""

    def __init__(self, members: Iterable[Member] = ()) -> None:
        ordered = sorted(members, key=sort_key)  # one sort, not an insertion per member
        self.keys: list[tuple[str, str]] = [sort_key(m) for m in ordered]  # sorted
        self.fragments: list[bytes] = [_json(m) for m in ordered]  # each member's JSON, in the same order
        self.members: dict[str, Member] = {m["id"]: m for m in ordered}
        self._encoded: bytes | None = None
        self._offsets: list[int] | None = None

    def add(self, member: Member) -> None:
        key = sort_key(member)
        index = bisect_left(self.keys, key)
        self.keys.insert(index, key)
        self.fragments.insert(index, _json(member))
        self.members[member["id"]] = member
        self._encoded = self._offsets = None

    def discard(self, member_id: str) -> None:
        member = self.members.pop(member_id, None)
        if member is None:
            return
        key = sort_key(member)
        index = bisect_left(self.keys, key)
        if index < len(self.keys) and self.keys[index] == key:
            del self.keys[index], self.fragments[index]
        self._encoded = self._offsets = None

    def settle(
        self, touched: dict[str, Member], now: Callable[[str], Member | None]
    ) -> tuple[list[Member], list[Member]]:
        """Bring the list up to date for the sessions that changed; the joins and leaves, sorted.

        `now(member_id)` is the member as the store has it now, or None when it is gone.
        """
        joins, leaves = [], []
        for member_id, member in touched.items():
            current, shown = now(member_id), member_id in self.members
            if current is not None and not shown:
                self.add(current)
                joins.append(current)
            elif shown and current is None:
                self.discard(member_id)
                leaves.append(member)
        return sorted(joins, key=sort_key), sorted(leaves, key=sort_key)

    @property
    def encoded(self) -> bytes:
        if self._encoded is None:
            self._encoded = b"[" + b",".join(self.fragments) + b"]"
        return self._encoded

    def with_member(self, member: Member, limit: int = SNAPSHOT_LIMIT) -> Snapshot:
        """The first `limit` members with `member` in its place: the cached bytes, cut where it
        goes and where the list stops (no copy)."""
        size = len(self.keys)
        if member["id"] in self.members:
            return Snapshot(self._first(limit), size)
        index = bisect_left(self.keys, sort_key(member))
        if index >= limit:  # the caller is past the snapshot's end
            return Snapshot(self._first(limit), size + 1)
        fragment = _json(member)
        if not self.keys:
            return Snapshot((b"[", fragment, b"]"), 1)
        head = self._cut(index)  # "[" and the members before the caller, each with its ","
        if index == size:
            return Snapshot((self._cut(size)[:-1], b",", fragment, b"]"), size + 1)
        tail = memoryview(self.encoded)[len(head) : len(self._cut(min(size, limit - 1))) - 1]
        if not tail:  # the caller is the last one shown
            return Snapshot((head, fragment, b"]"), size + 1)
        return Snapshot((head, fragment, b",", tail, b"]"), size + 1)

    def _cut(self, n: int) -> memoryview:
        """The cached JSON up to the end of the first `n` members, each followed by one character."""
        if self._offsets is None:
            # Where each member's JSON starts: after "[" and each earlier member and its ",".
            self._offsets = list(itertools.accumulate((len(f) + 1 for f in self.fragments), initial=1))
        return memoryview(self.encoded)[: self._offsets[n]]

    def _first(self, limit: int) -> tuple[bytes | memoryview, ...]:
        """The cached list cut after its first `limit` members."""
        if len(self.keys) <= limit:
            return (self.encoded,)
        return (self._cut(limit)[:-1], b"]")


def _json(member: Member) -> bytes:
    return orjson.dumps(member)
