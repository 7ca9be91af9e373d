"""Broadcasts across chatd processes: python-socketio's Redis client manager, plus control messages.

With `--redis-url`, every `sio.emit` to a room is delivered to the room's
sockets on this process and published on one Redis pub/sub channel, from which
every other process delivers it to its own sockets (python-socketio's
`AsyncRedisManager`). Rooms stay per-process; only emits cross.

chatd adds *control messages* on the same channel: things every process must do
for its own sockets that are not an emit, such as ending a session (emit
`session_ended`, disconnect, close the transport) or putting a stored chat
message in order before delivering it (`chat`, see ordering.py). They are JSON arrays
`["chatd", host_id, name, *args]`, told apart from python-socketio's own
messages (JSON objects) by their first byte, and handled by the callback
registered for `name`. Same channel, so they keep their order with the emits.

This leans on two of python-socketio's internal methods, `_publish` and
`_listen` (the hooks its pub/sub subclasses implement); setup.cfg pins
python-socketio's minor version, and tests/test_cluster.py fails if they move.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from socketio import AsyncRedisManager

from .broadcast import FastBroadcastMixin
from .socketrooms import RoomIndex

log = logging.getLogger("chatd.fanout")

CHANNEL = "chatd"
CONTROL_TAG = "chatd"
SUBSCRIBE_WAIT_SECONDS = 5.0

ControlHandler = Callable[..., Awaitable[None]]


def redis_address(url: str) -> str:
    """host:port of a Redis URL, for messages: never the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


# The MRO puts chatd's fast local delivery (broadcast.FastBroadcastMixin) between
# AsyncPubSubManager and AsyncManager: AsyncPubSubManager delivers on this process
# through `super().emit`, so the mixin serves both our own emits and those received
# from Redis; RoomIndex keeps disconnect storms cheap (socketrooms.py).
class RedisClientManager(RoomIndex, AsyncRedisManager, FastBroadcastMixin):
    """python-socketio's Redis manager with chatd's control messages and an explicit start and stop."""

    def __init__(self, url: str, *, channel: str = CHANNEL) -> None:
        super().__init__(url, channel=channel)
        self.control_handlers: dict[str, ControlHandler] = {}

    async def emit(self, event, data, namespace=None, room=None, skip_sid=None, callback=None, to=None, **kwargs):
        """An emit to one socket of this process (`welcome`, `chat_error`, …) stays here:
        socket ids are random, so no other process has that socket."""
        room = to or room
        if room is not None and self.is_sid_room(namespace or "/", room):
            kwargs["ignore_queue"] = True
        await super().emit(event, data, namespace=namespace, room=room, skip_sid=skip_sid, callback=callback, **kwargs)

    # -- control messages -----------------------------------------------------

    def on_control(self, name: str, handler: ControlHandler) -> None:
        self.control_handlers[name] = handler

    async def publish_control(self, name: str, *args) -> None:
        """Run `name`'s handler here and on every other process."""
        await self._run_control(name, args)
        await self._publish([CONTROL_TAG, self.host_id, name, *args])

    async def _listen(self):
        async for data in super()._listen():
            if data[:1] == b"[":  # python-socketio's own messages are objects
                self._control_received(data)
            else:
                # Text, not bytes: the server's JSON hook (realtime.OrjsonForSocketIO) reads str.
                yield data.decode("utf-8")

    def _control_received(self, data: bytes) -> None:
        try:
            tag, host_id, name, *args = self.json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            log.warning("dropped a malformed control message")
            return
        if tag == CONTROL_TAG and host_id != self.host_id:
            # A task: the pub/sub loop must keep reading while a handler waits.
            asyncio.ensure_future(self._run_control(name, args))

    async def _run_control(self, name: str, args) -> None:
        handler = self.control_handlers.get(name)
        if handler is None:
            log.warning("no handler for control message %r", name)
            return
        try:
            await handler(*args)
        except Exception:
            log.exception("control message %r failed", name)

    # -- lifetime ---------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe now, not at the first client (python-socketio's default): a
        process serves only once it hears every other process's broadcasts."""
        if not self.server.manager_initialized:
            self.server.manager_initialized = True
            self.initialize()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUBSCRIBE_WAIT_SECONDS
        while not (self.pubsub is not None and self.pubsub.subscribed):
            if loop.time() > deadline:
                raise ConnectionError(f"cannot subscribe to Redis at {redis_address(self.redis_url)}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        thread = getattr(self, "thread", None)
        if thread is not None:
            thread.cancel()
            await asyncio.gather(thread, return_exceptions=True)
        if self.pubsub is not None:
            await self.pubsub.aclose()
        if self.redis is not None:
            await self.redis.aclose()
