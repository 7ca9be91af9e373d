"""Who is online in each room: a snapshot once, then batched changes.

One entry per session (SPEC's Member, `{"id","name","account"}`), present in a
room while at least one of its sockets is there. `Presence` is the interface;
`memory.MemoryPresence` keeps it in this process, `redis.RedisPresence` shares
it between processes (each process mirrors the rooms it has sockets in, fed by
Redis's stream of membership changes; see that module). The parts:

- the store records each socket's joins and leaves and says when a session's
  membership changed (`_add`, `_remove`);
- `batching.ChangeBatcher` gathers those changes per room for a short window
  and then settles them (`_settle`: the net change since the last published
  state, which becomes the new published state) and publishes them through the
  callback rooms.py gives, which emits one `presence` event to the room;
- `snapshot` reads the published state of a room, already JSON-encoded (cached
  until the next change is published), plus the caller itself, as a
  `published.Snapshot`: pieces of the cached bytes, never copied per caller.

Why the snapshot is the *published* state and not the latest one: every socket
of the room holds exactly that state (it received the same events), so the
joiner's snapshot plus the events it receives afterwards (it enters the
Socket.IO room before reading the snapshot) is the truth, and the encoding is
made once per published change rather than once per handshake. The caller's
own entry is spliced in, so a welcome always lists the socket's own session.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Awaitable, Callable

from .batching import ChangeBatcher

if TYPE_CHECKING:  # published.py imports this module
    from .published import Snapshot

Member = dict  # {"id": str, "name": str, "account": str | None}
# publish(room, joins, leaves, count): one `presence` event to every socket of the room;
# `count` is how many are online there after it.
Publish = Callable[[str, list[Member], list[Member], int], Awaitable[None]]


def sort_key(member: Member) -> tuple[str, str]:
    """SPEC's order of `online` lists: name without regard to case, then id."""
    return member["name"].casefold(), member["id"]


class Presence(abc.ABC):
    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._batcher = ChangeBatcher(self._flush, self._window)

    async def join(self, room: str, socket_id: str, member: Member) -> None:
        """A socket entered a room; its session's arrival is published within the room's window."""
        if await self._add(room, socket_id, member):
            self._batcher.touch(room, member)

    async def leave(self, room: str, socket_id: str, member: Member) -> None:
        """A socket left a room; its session goes when its last socket there does."""
        if await self._remove(room, socket_id, member):
            self._batcher.touch(room, member)

    @abc.abstractmethod
    async def snapshot(self, room: str, member: Member) -> Snapshot:
        """The room's `online` list as JSON (bytes in pieces): its last published state, plus `member`
        (the caller), sorted as SPEC says."""

    async def start(self) -> None:
        """Before serving: a backend that needs to reach something does it here."""

    async def close(self) -> None:
        """Stop publishing (shutdown): pending changes are dropped with the sockets."""
        await self._batcher.close()

    # -- the store ----------------------------------------------------------

    @abc.abstractmethod
    async def _add(self, room: str, socket_id: str, member: Member) -> bool:
        """Record a socket in a room; True when its session was not there before.
        (The Redis store always says False: it hears every change, its own too, from
        Redis, and touches the batcher then.)"""

    @abc.abstractmethod
    async def _remove(self, room: str, socket_id: str, member: Member) -> bool:
        """Forget a socket in a room; True when that was its session's last socket there."""

    @abc.abstractmethod
    async def _settle(self, room: str, touched: dict[str, Member]) -> tuple[list[Member], list[Member]]:
        """Compare the touched sessions' current presence with the published state; make
        the current state the published one; the (joins, leaves) between the two."""

    @abc.abstractmethod
    def _published_count(self, room: str) -> int:
        """How many sessions the room's published state holds (what `presence` says as `count`)."""

    def online(self, room: str) -> int:
        """About how many sessions are online in the room."""
        return self._size(room)

    @abc.abstractmethod
    def _size(self, room: str) -> int:
        """About how many sessions are in the room (sets the batching window)."""

    # -- batching -----------------------------------------------------------

    def _window(self, room: str) -> float:
        return ChangeBatcher.window_for(self._size(room))

    async def _flush(self, room: str, touched: dict[str, Member]) -> None:
        joins, leaves = await self._settle(room, touched)
        if joins or leaves:
            await self._publish(room, joins, leaves, self._published_count(room))
