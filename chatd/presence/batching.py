"""Gathering a room's presence changes into one event per window (shared by every backend).

Each published event costs one frame per socket in the room, so the window
grows with the room: a small room hears within a few tens of milliseconds, a
room of thousands at most about once a second. SPEC's bound is on the whole
trip (a change reaches every socket within 1 s), and a batch to thousands of
sockets takes time to go out (written in slices, between other work: 150 ms and
more at 5,000 under load), so a room's window is also cut short by how long its
last batch took, keeping first change to last write within DEADLINE — but to
no less than half its size's window: on a server too loaded to keep the
deadline, more frequent batches would only load it more. A room's flushes run
one after the other, so its events leave in order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from ..tasks import TaskOwner

log = logging.getLogger("chatd.presence")

MIN_WINDOW = 0.05  # seconds: small rooms hear quickly
MAX_WINDOW = 0.9  # seconds: a room of thousands hears at most about once a second
DEADLINE = 0.9  # seconds from a room's first change to its batch written to every socket here (SPEC: 1 s)
MEMBERS_PER_SECOND = 2500  # the window is room size / this: frames per change stay flat as rooms grow

Flush = Callable[[str, dict[str, dict]], Awaitable[None]]


class ChangeBatcher:
    def __init__(self, flush: Flush, window: Callable[[str], float]) -> None:
        self._flush = flush
        self._window = window
        self._pending: dict[str, dict[str, dict]] = {}  # room -> member id -> member
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._running: dict[str, asyncio.Future] = {}  # room -> its latest flush
        self._took: dict[str, float] = {}  # room -> how long its last batch took to go out, when long
        self._tasks = TaskOwner("presence")
        self._closed = False

    @staticmethod
    def window_for(members: int) -> float:
        return min(MAX_WINDOW, max(MIN_WINDOW, members / MEMBERS_PER_SECOND))

    def touch(self, room: str, member: dict) -> None:
        """A session's presence in `room` changed; publish it with the room's next flush."""
        if self._closed:
            return
        pending = self._pending.get(room)
        if pending is None:
            pending = self._pending[room] = {}
            loop = asyncio.get_running_loop()
            window = self._window(room)
            took = self._took.get(room)
            if took is not None:
                window = min(window, max(window / 2, DEADLINE - took))
            self._timers[room] = loop.call_later(max(MIN_WINDOW, window), self._due, room)
        pending[member["id"]] = member

    def _due(self, room: str) -> None:
        del self._timers[room]
        touched = self._pending.pop(room)
        due_at = asyncio.get_running_loop().time()
        task = self._tasks.spawn(self._run(room, touched, self._running.get(room), due_at))
        self._running[room] = task
        task.add_done_callback(lambda done: self._running.get(room) is done and self._running.pop(room))

    async def _run(self, room: str, touched: dict[str, dict], previous: asyncio.Future | None, due_at: float) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await self._flush(room, touched)
        except Exception:
            log.exception("could not publish presence in %r", room)
        took = asyncio.get_running_loop().time() - due_at
        if took > MIN_WINDOW:  # only large rooms' batches take long: the dict stays small
            self._took[room] = took
        else:
            self._took.pop(room, None)

    async def close(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._pending.clear()
        running = list(self._running.values())
        if running:  # the flushes under way finish (their leaves reach the other processes)
            await asyncio.wait(running)
        await self._tasks.close()
