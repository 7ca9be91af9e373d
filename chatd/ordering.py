"""Ordered, exactly-once delivery of a room's changes on one process.

A *change* is a new message, an edit or a delete: `{"kind": "new"|"edited"|"deleted",
"message": …}`, the message part carrying the room and the change's `rev`.

Several processes store changes, and Redis hands their publications to each
process in whatever order they were published: rev 8 of a room, stored by
process A, may arrive here before rev 7, stored by process B a moment earlier.
Storage makes a room's revs gapless and increasing (1, 2, 3, …), and a change
never becomes visible in storage before every lower rev of its room (see SPEC,
"Order"). So each process can put a room's changes back in order by itself:

- It remembers, per room, the highest rev it has delivered (the *watermark*),
  and the highest message id among them (where a joiner's history stops).
- A change at watermark + 1 is delivered at once, followed by any held ones
  that now follow on.
- A change further ahead is held. If the gap is still open after
  `hold_seconds`, the process asks storage for what changed after the watermark
  (`history(since=…)`) and delivers the revs below the first held one: storage
  has every rev below one it has stored, so those publications are late or lost.
  A rev it no longer has there (its message changed again since, at a higher
  rev; or old data migrated with gaps) is passed over, and the held ones that
  then follow on go out. Revs above the first held one are not taken from
  storage: their publications may still be on their way, and one delivered
  early from storage would make that message's later changes duplicates and
  skip them. A later gap among the held waits its own hold.
- A message created inside such a gap and changed again since is in storage at
  its later rev only, so its `new` is passed over, and it goes out as `new`, as
  it is then, at the first change of it that does come (the sockets here never
  saw it; a deletion goes out as `deleted`, which they can ignore). It may so
  come after newer messages. The fill tells such messages by their ids: above
  the last one delivered as new when the fill began. Those it delivers itself
  go out as `new`; those at or above the first held rev, still on their way,
  it notes (`unseen`) until one of their changes goes out.
- A change at or below the watermark, or already held, is a duplicate: dropped.

Where a room's watermark starts: at storage's current rev for the room, read the
first time this process needs the room — when a local socket joins it (see
`enter`) or when a change for it arrives. Everything up to there is in the
history a joining socket is sent; everything after it comes live. So a
process that has just started, or a room whose old revs have gaps, starts from
what storage holds now, and older gaps never stall delivery.

A joining socket must enter the room and read the watermark with no delivery
in between: `enter` runs the caller's join (which does not wait) while no
delivery is under way and returns the highest message id delivered; the
socket's history is then the messages up to it, less those `passed_over` (read
in the same step: they come live as `new`).

When the last local socket leaves a room, the caller `forget`s it, and feeds
the sequencer only the changes of rooms it `tracks`: every process hears every
room's changes, and one with no socket in a room has nothing to order. A
change dropped that way was stored before it was published, so the next start
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


def change(kind: str, message: dict) -> dict:
    """A change as the sequencer takes it: `kind` is new, edited or deleted."""
    return {"kind": kind, "message": message}


@dataclass(slots=True)
class _Room:
    delivered: int  # the watermark: the highest rev delivered here (or in every joiner's history)
    last_id: int  # the highest message id among them: a joiner's history stops there
    held: dict[int, dict] = field(default_factory=dict)  # rev -> change
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gap_timer: asyncio.TimerHandle | None = None
    # Ids of messages whose `new` a gap passed over. Each has a change still on its way, and
    # leaves the set when a change of that message goes out here (published, or from a fill).
    unseen: set[int] = field(default_factory=set)


class Sequencer:
    """Per room: `receive` changes in any order, with repeats; `deliver` sees each once, in rev order."""

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
        last_id, last_rev = await self.storage.revision(name)
        room = self._rooms[name] = _Room(delivered=last_rev, last_id=last_id)
        return room

    async def enter(self, name: str, join: Callable[[], None]) -> int:
        """Run `join` (a socket entering the room) with no delivery alongside; the last message id then.

        The socket is sent every change after the watermark, so its history should
        be the messages up to the returned id. `join` does not wait, so where no
        delivery holds the room's lock the two happen with nothing in between, and
        the lock is not taken (a session in 50 rooms enters them all per handshake).
        """
        room = self._rooms.get(name)
        if room is not None and not room.lock.locked():
            join()
            return room.last_id
        while True:
            room = await self._room(name)
            async with room.lock:
                if self._rooms.get(name) is not room:
                    continue  # forgotten while we waited: the room restarts from storage
                join()
                return room.last_id

    def watermark(self, name: str) -> int | None:
        """The highest message id delivered here (None: the room is not ordered here)."""
        room = self._rooms.get(name)
        return None if room is None else room.last_id

    def passed_over(self, name: str) -> frozenset[int]:
        """Ids up to the watermark that have not gone out as `new` here and will, live (a gap
        passed over their `new`): a joiner's history leaves them out, or it would get them twice."""
        room = self._rooms.get(name)
        return frozenset(room.unseen) if room is not None else frozenset()

    def tracks(self, name: str) -> bool:
        """Whether this process follows the room (some local socket entered it, and it was not forgotten)."""
        return name in self._rooms or name in self._starting

    async def forget(self, name: str, unused: Callable[[], bool] = lambda: True) -> None:
        """Drop a room's state if `unused()` (no local socket is in it), checked under its lock.

        Under the lock, so a socket entering the room meanwhile is either seen by
        `unused` or enters a fresh room; and a forgotten room restarts from storage.
        """
        room = self._rooms.get(name)
        if room is None or not unused():
            return  # still in use here (the common case): no wait behind a delivery under way
        async with room.lock:
            if self._rooms.get(name) is room and unused():
                del self._rooms[name]
                if room.gap_timer is not None:
                    room.gap_timer.cancel()
                    room.gap_timer = None

    # -- changes ----------------------------------------------------------------------

    async def receive(self, change: dict) -> None:
        name, rev = change["message"]["room"], change["message"]["rev"]
        room = await self._room(name)
        async with room.lock:
            if self._rooms.get(name) is not room:
                return  # forgotten meanwhile: no local socket wants it, and a new start reads storage
            if rev <= room.delivered or rev in room.held:
                return  # a duplicate
            room.held[rev] = change
            await self._deliver_in_order(room)
            self._watch_gap(name, room)

    async def _deliver_in_order(self, room: _Room) -> None:
        while (change := room.held.pop(room.delivered + 1, None)) is not None:
            await self._deliver(room, change)

    async def _deliver(self, room: _Room, change: dict) -> None:
        message = change["message"]
        room.delivered = message["rev"]
        if room.unseen and message["id"] in room.unseen:
            room.unseen.discard(message["id"])
            if change["kind"] == "edited":
                change = {"kind": "new", "message": message}  # its `new` was passed over in a gap: unseen here
        if change["kind"] == "new":
            room.last_id = max(room.last_id, message["id"])
        try:
            await self.deliver(change)
        except Exception:  # one failed delivery must not stop the room's later ones
            log.exception("delivery of rev %s in %r failed", message.get("rev"), message.get("room"))

    def _watch_gap(self, name: str, room: _Room) -> None:
        if room.held and room.gap_timer is None:
            room.gap_timer = self.tasks.later(self.hold_seconds, self._fill_gap, name, room)
        elif not room.held and room.gap_timer is not None:
            room.gap_timer.cancel()
            room.gap_timer = None

    async def _fill_gap(self, name: str, room: _Room) -> None:
        """The gap outlived the hold: storage's revs below the first held one, then what follows on."""
        async with room.lock:
            room.gap_timer = None
            if self._rooms.get(name) is not room or not room.held:
                return  # forgotten, or the gap closed, meanwhile
            try:
                await self._fetch_missing(name, room)
            except Exception:
                log.exception("could not fetch the missing changes of %r", name)
                # Without storage the gap cannot be filled: send what is held, in order, rather than stall.
                for rev in sorted(room.held):
                    if rev > room.delivered:
                        await self._deliver(room, room.held[rev])
                room.held.clear()
            self._watch_gap(name, room)  # a later gap among the held gets its own hold

    async def _fetch_missing(self, name: str, room: _Room) -> None:
        first_held, last_id = min(room.held), room.last_id
        since = room.delivered
        while True:
            page = await self.storage.history(name, since=since, limit=HISTORY_MAX)
            for item in page:
                if item["rev"] < first_held:
                    await self._deliver(room, self._as_change(room, item, last_id))
                elif item["id"] > last_id:  # created after the watermark: maybe inside the gap
                    room.unseen.add(item["id"])
            if len(page) < HISTORY_MAX or page[-1]["rev"] >= first_held:
                break
            since = page[-1]["rev"]
        # The revs storage no longer has below `first_held` were superseded: their messages come later.
        room.delivered = max(room.delivered, first_held - 1)
        await self._deliver_in_order(room)

    @staticmethod
    def _as_change(room: _Room, item: dict, known: int) -> dict:
        """A row of `history` `since` as the change this process delivers for it.

        `known`: the last id delivered as new when the fill began. A message above it
        was created after the watermark, so its `new` never went out here, even where
        the fill has since delivered a later message's `new` (it took the older one's
        creation rev along with an edit: only the edit's rev is in storage).
        """
        if item.get("deleted"):
            room.last_id = max(room.last_id, item["id"])  # created in the gap, then deleted: never new here
            return change("deleted", {"room": item["room"], "id": item["id"], "rev": item["rev"]})
        return change("new" if item["id"] > known else "edited", item)

    async def close(self) -> None:
        """Stop every gap timer and room start still pending (shutdown)."""
        await self.tasks.close()
