"""Background tasks with an owner.

asyncio keeps only a weak reference to a task: one created and forgotten may be
collected mid-flight, and its exception is never seen. Every background task in
chatd is started through a `TaskOwner`, which keeps it until it ends, logs its
failure, and cancels what is still running when its owner shuts down.
(tests/test_internals.py fails if a task is created anywhere else.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Coroutine

log = logging.getLogger("chatd.tasks")


class TaskOwner:
    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Future] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any] | Awaitable[Any]) -> asyncio.Future:
        """Run `coro` in the background; kept until done, its failure logged."""
        task = asyncio.ensure_future(coro)
        if self._closed:  # shutting down: nothing new starts
            task.cancel()
            return task
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def later(self, delay: float, start: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> asyncio.TimerHandle:
        """`spawn(start(*args))` after `delay` seconds (a timer, not a sleeping task); a timer
        that comes due after `close` starts nothing."""

        def fire() -> None:
            if not self._closed:
                self.spawn(start(*args))

        return asyncio.get_running_loop().call_later(delay, fire)

    def _done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a background task of %s failed", self.name, exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, grace: float = 0.0) -> None:
        """Let running tasks finish for up to `grace` seconds, then cancel the rest and wait
        for them to end; no timer starts a task after this."""
        self._closed = True
        if grace > 0 and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
