"""Group commit: messages that arrive while a transaction is being written wait and
then share the next one, so many messages pay for one commit (one fsync).

No message is answered before the transaction holding it has committed. One
writer at a time also means ids are handed out in commit order.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, TypeVar

from ..tasks import TaskOwner

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_BATCH = 512  # bounds one transaction's size and the latency of those behind it


class GroupCommit(Generic[Item, Result]):
    def __init__(self, write_batch: Callable[[list[Item]], Awaitable[list[Result]]]) -> None:
        self._write_batch = write_batch
        self._pending: list[tuple[Item, asyncio.Future]] = []
        self._writer: asyncio.Future | None = None
        self._tasks = TaskOwner("group commit")

    async def submit(self, item: Item) -> Result:
        future = asyncio.get_running_loop().create_future()
        # Retrieve the outcome even when the caller has given up (no "never retrieved" noise).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.append((item, future))
        if self._writer is None:
            self._writer = self._tasks.spawn(self._write_all())
        # shield: a caller that gives up does not cancel the batch others are waiting on.
        return await asyncio.shield(future)

    async def _write_all(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    results = await self._write_batch([item for item, _ in batch])
                except BaseException as exc:  # every waiter learns; the writer goes on with the next batch
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._writer = None

    async def drain(self) -> None:
        """Wait until everything submitted so far is written (for close)."""
        while self._writer is not None:
            await asyncio.wait([self._writer])
