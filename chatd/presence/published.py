"""A room's *published* members — what every socket of the room holds — kept ready to send.

Sorted in SPEC's order in two parallel lists, with each member's JSON made
once. The list's JSON is joined at most once per published change and reused
by every snapshot until the next one, so a handshake into a room of thousands
copies text instead of encoding thousands of members. Shared by every backend.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from typing import Callable, Iterable

import orjson

from . import Member, sort_key


class PublishedList:
    """A room's published members, sorted, with their JSON."""

    def __init__(self, members: Iterable[Member] = ()) -> None:
        ordered = sorted(members, key=sort_key)  # one sort, not an insertion per member
        self.keys: list[tuple[str, str]] = [sort_key(m) for m in ordered]  # sorted
        self.fragments: list[str] = [_json(m) for m in ordered]  # each member's JSON, in the same order
        self.members: dict[str, Member] = {m["id"]: m for m in ordered}
        self._encoded: str | None = None
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
    def encoded(self) -> str:
        if self._encoded is None:
            self._encoded = "[" + ",".join(self.fragments) + "]"
        return self._encoded

    def with_member(self, member: Member) -> str:
        """The JSON list with `member` in its place; the cached text when it is there already."""
        if member["id"] in self.members:
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
