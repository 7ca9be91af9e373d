"""Prometheus metrics (`--metrics`): what a chatd process is doing, at GET /metrics.

Each app has its own `Metrics` (its own prometheus-client registry, so that
several apps in one process, as in the tests, never share counters). The
counters are always kept, at the cost of an addition; `/metrics` is only
served with `--metrics`, and only then is storage wrapped to time its calls.
The gauges (sockets, rooms, members) are read from the live state when a
scrape comes, on the event loop; the text is then rendered off the loop,
since the process collector reads /proc.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import generate_latest

# Storage calls are local SQLite or a nearby PostgreSQL: from 0.5 ms to seconds.
STORAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.sockets = Gauge("chatd_sockets_connected", "Socket.IO connections with a session.", registry=self.registry)
        self.rooms = Gauge("chatd_rooms_active", "Chat rooms with at least one socket here.", registry=self.registry)
        self.members = Gauge(
            "chatd_members_online", "Sessions with at least one socket here (tabs counted once).", registry=self.registry
        )
        self.handshakes = Counter(
            "chatd_handshakes",
            "Socket.IO handshakes by result (accepted, refused) and refusal reason.",
            ["result", "reason"],
            registry=self.registry,
        )
        self.messages = Counter("chatd_messages_stored", "Chat messages stored and acked.", registry=self.registry)
        self.event_errors = Counter(
            "chatd_event_errors", "Socket.IO events answered with an error, by code.", ["code"], registry=self.registry
        )
        self.storage_seconds = Histogram(
            "chatd_storage_seconds",
            "Time a storage call takes, by operation.",
            ["operation"],
            buckets=STORAGE_BUCKETS,
            registry=self.registry,
        )
        self.slow_closed = Counter(
            "chatd_connections_closed_slow",
            "Connections closed because they did not read (more than 1 MiB, or a frame 30 s, waiting).",
            registry=self.registry,
        )
        self.tasks = Gauge("chatd_asyncio_tasks", "asyncio tasks alive in the process.", registry=self.registry)
        self._accepted = self.handshakes.labels("accepted", "")

    # -- hooks, called where things happen ----------------------------------

    def handshake_accepted(self) -> None:
        self._accepted.inc()

    def handshake_refused(self, reason: str) -> None:
        self.handshakes.labels("refused", reason).inc()

    def message_stored(self) -> None:
        self.messages.inc()

    def event_error(self, code: str) -> None:
        self.event_errors.labels(code).inc()

    def connection_closed_slow(self) -> None:
        self.slow_closed.inc()

    def timed(self, storage: Any) -> TimedStorage:
        return TimedStorage(storage, self.storage_seconds)

    # -- the scrape ---------------------------------------------------------

    async def exposition(self, sockets: int, rooms: int, members: int) -> bytes:
        self.sockets.set(sockets)
        self.rooms.set(rooms)
        self.members.set(members)
        self.tasks.set(len(asyncio.all_tasks()))
        return await asyncio.to_thread(generate_latest, self.registry)


class TimedStorage:
    """A storage backend whose every coroutine method is timed into the histogram.

    A proxy rather than edits in each backend: any backend, any method it adds.
    """

    def __init__(self, inner: Any, histogram: Histogram) -> None:
        self._inner = inner
        self._histogram = histogram

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        observe = self._histogram.labels(name).observe

        @functools.wraps(attr)
        async def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                observe(time.perf_counter() - start)

        setattr(self, name, timed)  # found directly from now on
        return timed
