"""Ordered, exactly-once delivery of a room's messages on one process.

Several processes store messages, and Redis hands their publications to each
process in whatever order they were published: message 8 of a room, stored by
process A, may arrive here before message 7, stored by process B a moment
earlier. Storage makes a room's ids gapless and increasing (1, 2, 3, …), and a
message never becomes visible in storage before every lower id of its room
(see SPEC, "Order"). So each process can put a room's messages back in order
by itself:

- It remembers, per room, the highest id it has delivered (the *watermark*).
- A message at watermark + 1 is delivered at once, followed by any held ones
  that now follow on.
- A message further ahead is held. If the gap is still open after
  `hold_seconds`, the process asks storage for what follows the watermark
  (`history(after=…)`): storage already has the missing messages (they are
  older than one it holds), or they do not exist (old data migrated with gaps),
  so after that fetch everything held can go out, in order.
- A message at or below the watermark, or already held, is a duplicate: dropped.

Where a room's watermark starts: at storage's latest id for the room, read the
first time this process needs the room — when a local socket joins it (see
`enter`) or when a message for it arrives. Everything up to there is in the
history a joining socket is sent; everything after it comes as `new chat`. So a
process that has just started, or a room whose old ids have gaps, starts from
what storage holds now, and older gaps never stall delivery.

A joining socket must enter the room and read the watermark with no delivery
in between: `enter` runs the caller's join under the room's lock and returns the
watermark; the socket's history is then everything up to it.

When the last local socket leaves a room, the caller `forget`s it, and feeds
the sequencer only the messages of rooms it `tracks`: every process hears every
room's messages, and one with no socket in a room has nothing to order. A
message dropped that way was stored before it was published, so the next start
of the room (from storage) counts it as history.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .storage import HISTORY_MAX, Storage
from .tasks import TaskOwner

log = logging.getLogger("chatd.ordering")

HOLD_SECONDS = 0.3

Deliver = Callable[[dict], Awaitable[None]]


@dataclass(slots=True)
class _Room:
    delivered: int  # the watermark: the highest id delivered here (or in every joiner's history)
    held: dict[int, dict] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gap_timer: asyncio.TimerHandle | None = None


class Sequencer:
    """Per room: `receive` messages in any order, with repeats; `deliver` sees each once, in id order."""

    def __init__(self, storage: Storage, deliver: Deliver, *, hold_seconds: float = HOLD_SECONDS) -> None:
        self.storage = storage
        self.deliver = deliver
        self.hold_seconds = hold_seconds
        self._rooms: dict[str, _Room] = {}
        self._starting: dict[str, asyncio.Future[_Room]] = {}
        self.tasks = TaskOwner("the sequencer")

    # -- rooms ----------------------------------------------------------------------

    async def _room(self, name: str) -> _Room:
        room = self._rooms.get(name)
        if room is not None:
            return room
        starting = self._starting.get(name)
        if starting is None:  # the first to need the room reads storage; the others wait for it
            starting = self._starting[name] = self.tasks.spawn(self._start(name))
            starting.add_done_callback(lambda _: self._starting.pop(name, None))
        return await asyncio.shield(starting)

    async def _start(self, name: str) -> _Room:
        latest = await self.storage.history(name, limit=1)
        room = self._rooms[name] = _Room(delivered=latest[-1]["id"] if latest else 0)
        return room

    async def enter(self, name: str, join: Callable[[], Awaitable[None]]) -> int:
        """Run `join` (a socket entering the room) with no delivery alongside; the watermark then.

        The socket is sent every message after the returned id, so its history should
        be the messages up to it.
        """
        while True:
            room = await self._room(name)
            async with room.lock:
                if self._rooms.get(name) is not room:
                    continue  # forgotten while we waited: the room restarts from storage
                await join()
                return room.delivered

    def watermark(self, name: str) -> int | None:
        room = self._rooms.get(name)
        return None if room is None else room.delivered

    def tracks(self, name: str) -> bool:
        """Whether this process follows the room (some local socket entered it, and it was not forgotten)."""
        return name in self._rooms or name in self._starting

    async def forget(self, name: str, unused: Callable[[], bool] = lambda: True) -> None:
        """Drop a room's state if `unused()` (no local socket is in it), checked under its lock.

        Under the lock, so a socket entering the room meanwhile is either seen by
        `unused` or enters a fresh room; and a forgotten room restarts from storage.
        """
        room = self._rooms.get(name)
        if room is None:
            return
        async with room.lock:
            if self._rooms.get(name) is room and unused():
                del self._rooms[name]
                if room.gap_timer is not None:
                    room.gap_timer.cancel()
                    room.gap_timer = None

    # -- messages ---------------------------------------------------------------------

    async def receive(self, message: dict) -> None:
        name, id_ = message["room"], message["id"]
        room = await self._room(name)
        async with room.lock:
            if self._rooms.get(name) is not room:
                return  # forgotten meanwhile: no local socket wants it, and a new start reads storage
            if id_ <= room.delivered or id_ in room.held:
                return  # a duplicate
            room.held[id_] = message
            await self._deliver_in_order(room)
            self._watch_gap(name, room)

    async def _deliver_in_order(self, room: _Room) -> None:
        while (message := room.held.pop(room.delivered + 1, None)) is not None:
            room.delivered = message["id"]
            await self._deliver(message)

    async def _deliver(self, message: dict) -> None:
        try:
            await self.deliver(message)
        except Exception:  # one failed delivery must not stop the room's later ones
            log.exception("delivery of message %s in %r failed", message.get("id"), message.get("room"))

    def _watch_gap(self, name: str, room: _Room) -> None:
        if room.held and room.gap_timer is None:
            room.gap_timer = self.tasks.later(self.hold_seconds, self._fill_gap, name, room)
        elif not room.held and room.gap_timer is not None:
            room.gap_timer.cancel()
            room.gap_timer = None

    async def _fill_gap(self, name: str, room: _Room) -> None:
        """The gap outlived the hold: what storage has after the watermark, then all that is held."""
        async with room.lock:
            room.gap_timer = None
            if self._rooms.get(name) is not room:
                return  # forgotten meanwhile
            try:
                await self._fetch_missing(name, room)
            except Exception:
                log.exception("could not fetch the missing messages of %r", name)
            # Whatever is still held is past a gap storage does not have: send it in order.
            for id_ in sorted(room.held):
                if id_ > room.delivered:
                    room.delivered = id_
                    await self._deliver(room.held[id_])
            room.held.clear()

    async def _fetch_missing(self, name: str, room: _Room) -> None:
        while room.held and min(room.held) > room.delivered + 1:
            page = await self.storage.history(name, after=room.delivered, limit=HISTORY_MAX)
            for message in page:
                if message["id"] > room.delivered:
                    room.held.pop(message["id"], None)
                    room.delivered = message["id"]
                    await self._deliver(message)
            await self._deliver_in_order(room)
            if len(page) < HISTORY_MAX:
                return

    async def close(self) -> None:
        """Stop every gap timer and room start still pending (shutdown)."""
        await self.tasks.close()
