"""Chat rooms on this process: entering and leaving them (presence included), and the fan-out
of a room's changes (`new chat`, `chat edited`, `chat deleted`).

Every broadcast goes through python-socketio rooms named `room:<name>`, so that a
Redis client manager can carry them across processes. A room's changes are the
exception: a stored change is handed once to every process's sequencer
(ordering.py), which emits it to that process's sockets only, in rev order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .ordering import Sequencer, change
from .presence import Member, Presence, Publish
from .presence.published import Snapshot
from .sessions import Identity
from .sio.managers import RedisClientManager
from .sio.server import ChatServer
from .storage import Storage

WELCOME_HISTORY = 50
KINDS = ("new", "edited", "deleted")  # of a change: `new chat`, `chat edited`, `chat deleted`


def chat_room(name: str) -> str:
    return "room:" + name


@dataclass(slots=True)
class SocketState:
    """What this process knows of one connected socket."""

    user: Identity
    rooms: set[str] = field(default_factory=set)
    expiry: asyncio.TimerHandle | None = None
    welcome: tuple[dict, Snapshot] | None = None  # made by the connect handler, sent after the CONNECT answer


class Rooms:
    def __init__(
        self,
        sio: ChatServer,
        storage: Storage,
        presence: Callable[[Publish], Presence],
        cluster: RedisClientManager | None,
    ) -> None:
        self.sio = sio
        self.storage = storage
        self.cluster = cluster
        self.presence = presence(self._publish_presence)
        # Every change reaches this process's sockets through the sequencer: once each, in rev order.
        self.sequencer = Sequencer(storage, self._deliver_change)
        if cluster is not None:
            cluster.on_control("change", self._change_published)

    # -- entering and leaving -----------------------------------------------------

    async def enter(self, sid: str, state: SocketState, room: str) -> tuple[list[dict], Snapshot]:
        """Join a chat room: its latest history and its online list (JSON text, encoded ahead).

        The socket enters the Socket.IO room before the list is read, so every
        `presence` event published after that list reaches it too.
        """
        state.rooms.add(room)
        # The history stops where this socket's live changes start (ordering.py).
        watermark = await self.sequencer.enter(room, lambda: self.sio.enter_room(sid, chat_room(room)))
        member = state.user.presence_member()
        await self.presence.join(room, sid, member)
        history = await self.history_until(room, watermark)
        return history, await self.presence.snapshot(room, member)

    async def again(self, state: SocketState, room: str) -> tuple[list[dict], Snapshot]:
        """A room the socket is in already: its history up to what it was sent, and its online list."""
        history = await self.history_until(room, self.sequencer.watermark(room))
        return history, await self.presence.snapshot(room, state.user.presence_member())

    async def leave(self, sid: str, state: SocketState, room: str) -> None:
        state.rooms.discard(room)
        await self.sio.leave_room(sid, chat_room(room))
        await self.presence.leave(room, sid, state.user.presence_member())
        await self._release(sid, [room])

    async def leave_all(self, sid: str, state: SocketState) -> None:
        """A socket disconnected (python-socketio takes it out of its rooms itself)."""
        member = state.user.presence_member()
        for room in state.rooms:
            await self.presence.leave(room, sid, member)
        await self._release(sid, state.rooms)

    async def history_until(self, room: str, watermark: int | None) -> list[dict]:
        """The latest messages up to `watermark`, the last message id this process delivered to the room."""
        if watermark is None:  # not ordered here (cannot be, for a room a socket is in): the latest
            return await self.storage.history(room, limit=WELCOME_HISTORY)
        if watermark == 0:
            return []
        return await self.storage.history(room, before=watermark + 1, limit=WELCOME_HISTORY)

    async def _release(self, sid: str, rooms: Iterable[str]) -> None:
        """Rooms where no other socket of this process is left stop being ordered here."""
        for room in list(rooms):

            def unused(room: str = room) -> bool:  # `sid` itself is still listed while it disconnects
                # The room's size, not a walk through it: a storm of N disconnects stays O(N).
                size = self.sio.manager.room_size("/", chat_room(room))
                return size == 0 or (size == 1 and chat_room(room) in self.sio.manager.get_rooms(sid, "/"))

            await self.sequencer.forget(room, unused)

    async def _publish_presence(self, room: str, joins: list[Member], leaves: list[Member]) -> None:
        """One `presence` event to this process's sockets of a room: with several processes, each
        computes its own sockets' events from Redis's stream of changes (presence/redis.py)."""
        event = {"room": room, "joins": joins, "leaves": leaves}
        await self.sio.emit("presence", event, room=chat_room(room), ignore_queue=True)

    # -- changes: stored, then ordered and delivered on every process ------------------------

    async def publish_change(self, kind: str, message: dict) -> None:
        """Hand a stored change (new, edited, deleted) to every process's sequencer, this one's included."""
        if self.cluster is not None:
            await self.cluster.publish_control("change", change(kind, message))
        else:
            await self._change_published(change(kind, message))

    async def _change_published(self, published: dict) -> None:
        # Rooms without a socket here are not ordered here: the next join starts them from storage.
        if not (isinstance(published, dict) and published.get("kind") in KINDS):
            return
        message = published.get("message")
        if isinstance(message, dict) and self.sequencer.tracks(message.get("room")):
            await self.sequencer.receive(published)

    async def _deliver_change(self, published: dict) -> None:
        """The sequencer's output: to this process's sockets in the room only (every process runs one)."""
        message, kind = published["message"], published["kind"]
        room = chat_room(message["room"])
        if kind == "new":
            await self.sio.emit("new chat", message, room=room, ignore_queue=True)
        elif kind == "edited":
            await self.sio.emit("chat edited", message, room=room, ignore_queue=True)
        else:
            await self.sio.emit("chat deleted", message, room=room, ignore_queue=True)

    async def close(self) -> None:
        await self.presence.close()  # nobody is left to tell
        await self.sequencer.close()
