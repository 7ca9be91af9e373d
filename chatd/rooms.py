"""Chat rooms on this process: entering and leaving them (presence included), the fan-out
of a room's changes (`new chat`, `chat edited`, `chat deleted`), and the rooms that
follow the person.

Every broadcast goes through python-socketio rooms named `room:<name>`, so that a
Redis client manager can carry them across processes. A room's changes are the
exception: a stored change is handed once to every process's sequencer
(ordering.py), which emits it to that process's sockets only, in rev order.

A session's rooms are kept in storage per owner (`storage.owner_key`: an account,
or a guest session). Every socket of an owner is also in the Socket.IO room
`person:<owner>`; a join, a leave or a moved read marker is a control message
(`rooms`, `room_state`) that every process applies to its own sockets of that owner.
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


def person_room(owner: str) -> str:
    """Every socket of an owner (an account's: of all its sessions), on every process."""
    return "person:" + owner


@dataclass(slots=True)
class SocketState:
    """What this process knows of one connected socket."""

    user: Identity
    owner: str  # storage.owner_key: whose rooms and read markers
    rooms: set[str] = field(default_factory=set)
    expiry: asyncio.TimerHandle | None = None
    welcome: tuple[dict, Snapshot] | None = None  # made by the connect handler, sent after the CONNECT answer


class Rooms:
    def __init__(
        self,
        sio: ChatServer,
        sockets: dict[str, SocketState],
        storage: Storage,
        presence: Callable[[Publish], Presence],
        cluster: RedisClientManager | None,
    ) -> None:
        self.sio = sio
        self.sockets = sockets
        self.storage = storage
        self.cluster = cluster
        self.presence = presence(self._publish_presence)
        # Every change reaches this process's sockets through the sequencer: once each, in rev order.
        self.sequencer = Sequencer(storage, self._deliver_change)
        if cluster is not None:
            cluster.on_control("change", self._change_published)
            cluster.on_control("rooms", self._rooms_changed)
            cluster.on_control("room_state", self._room_state_moved)
            cluster.on_control("typing", self._typing)

    # -- entering and leaving -----------------------------------------------------

    async def enter(self, sid: str, state: SocketState, room: str) -> tuple[list[dict], Snapshot]:
        """Join a chat room: its latest history and its online list (JSON text, encoded ahead).

        The socket enters the Socket.IO room before the list is read, so every
        `presence` event published after that list reaches it too.
        """
        watermark, passed_over = await self.enter_quietly(sid, state, room)
        history = await self.history_until(room, watermark, passed_over)
        return history, await self.presence.snapshot(room, state.user.presence_member())

    async def enter_quietly(
        self, sid: str, state: SocketState, room: str, member: Member | None = None
    ) -> tuple[int, frozenset[int]]:
        """Join a chat room, its live events and its presence, without reading its history or
        list (the rooms a socket enters at connect); where its live changes start: the id its
        live `new chat`s start after, and older ids that will come live as `new chat` too.
        `member`: the session's presence Member, where the caller has it already."""
        state.rooms.add(room)
        # The history stops where this socket's live changes start (ordering.py); both read
        # in the same step as the join, with no delivery between.
        watermark = await self.sequencer.enter(room, lambda: self._enter_sio_room(sid, room))
        passed_over = self.sequencer.passed_over(room)
        await self.presence.join(room, sid, member or state.user.presence_member())
        return watermark, passed_over

    def _enter_sio_room(self, sid: str, room: str) -> None:
        # The manager's own step, not `AsyncServer.enter_room`'s two coroutines and a log
        # line around it: a session in 50 rooms takes this 50 times per handshake; and
        # it does not wait, as the sequencer's `enter` needs.
        self.sio.manager.basic_enter_room(sid, "/", chat_room(room))

    async def again(self, state: SocketState, room: str) -> tuple[list[dict], Snapshot]:
        """A room the socket is in already: its history up to what it was sent, and its online list."""
        watermark, passed_over = self.sequencer.watermark(room), self.sequencer.passed_over(room)
        history = await self.history_until(room, watermark, passed_over)
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

    async def history_until(
        self, room: str, watermark: int | None, passed_over: frozenset[int] = frozenset()
    ) -> list[dict]:
        """The latest messages up to `watermark`, the last message id this process delivered to the
        room, less `passed_over`: those the socket will be sent live as `new chat` (ordering.py)."""
        if watermark is None:  # not ordered here (cannot be, for a room a socket is in): the latest
            return await self.storage.history(room, limit=WELCOME_HISTORY)
        if watermark == 0:
            return []
        history = await self.storage.history(room, before=watermark + 1, limit=WELCOME_HISTORY)
        return [m for m in history if m["id"] not in passed_over] if passed_over else history

    async def _release(self, sid: str, rooms: Iterable[str]) -> None:
        """Rooms where no other socket of this process is left stop being ordered here."""
        manager = self.sio.manager

        def unused(room: str) -> bool:  # `sid` itself is still listed while it disconnects
            # The room's size, not a walk through it: a storm of N disconnects stays O(N).
            key = chat_room(room)
            size = manager.room_size("/", key)
            return size == 0 or (size == 1 and key in manager.get_rooms(sid, "/"))

        for room in list(rooms):
            # Checked here first: a room others are still in (the common case) costs no
            # step more; `forget` checks again under the room's lock.
            if unused(room):
                await self.sequencer.forget(room, lambda room=room: unused(room))

    async def _publish_presence(self, room: str, joins: list[Member], leaves: list[Member], count: int) -> None:
        """One `presence` event to this process's sockets of a room: with several processes, each
        computes its own sockets' events from Redis's stream of changes (presence/redis.py)."""
        event = {"room": room, "joins": joins, "leaves": leaves, "count": count}
        await self.sio.manager.emit_in_slices("presence", event, "/", chat_room(room))

    # -- the person's rooms, on every process ----------------------------------------------

    async def _control(self, name: str, *args) -> None:
        """Run a control message's handler on every process (only here, without Redis)."""
        if self.cluster is not None:
            await self.cluster.publish_control(name, *args)
        else:
            handlers = {"rooms": self._rooms_changed, "room_state": self._room_state_moved, "typing": self._typing}
            await handlers[name](*args)

    async def person_changed(self, owner: str, change: str, room: str, origin: str, reason: str = "left") -> None:
        """A room was added to (`joined`) or removed from (`left`) an owner's rooms: every other
        socket of the owner, on every process, enters or leaves it and is told."""
        await self._control("rooms", owner, change, room, origin, reason)

    async def marker_moved(self, owner: str, state: dict, origin: str) -> None:
        """The owner's read marker moved: its other sockets, on every process, get `room state`."""
        await self._control("room_state", owner, state, origin)

    def _local_sockets(self, owner: str, origin: str) -> list[tuple[str, SocketState]]:
        found = []
        for sid, _ in list(self.sio.manager.get_participants("/", person_room(owner))):
            state = self.sockets.get(sid)
            if sid != origin and state is not None:
                found.append((sid, state))
        return found

    async def _rooms_changed(self, owner: str, change: str, room: str, origin: str, reason: str) -> None:
        for sid, state in self._local_sockets(owner, origin):
            if change == "joined" and room not in state.rooms:
                await self.enter_quietly(sid, state, room)
                await self.sio.emit("joined", {"room": room}, to=sid, ignore_queue=True)
            elif change == "left" and room in state.rooms:
                await self.leave(sid, state, room)
                await self.sio.emit("left", {"room": room, "reason": reason}, to=sid, ignore_queue=True)

    async def typing(self, room: str, member: Member) -> None:
        """`typing` to the room's sockets of other sessions, on every process."""
        await self._control("typing", room, member)

    async def _typing(self, room: str, member: Member) -> None:
        # Only rooms of at most 100 online get here: the walk to skip the typist's own sockets is short.
        participants = self.sio.manager.get_participants("/", chat_room(room))
        own = [sid for sid, _ in participants if (s := self.sockets.get(sid)) and s.user.member_id == member["id"]]
        event = {"room": room, "member": member}
        await self.sio.emit("typing", event, room=chat_room(room), skip_sid=own, ignore_queue=True)

    async def _room_state_moved(self, owner: str, state: dict, origin: str) -> None:
        for sid, _ in self._local_sockets(owner, origin):
            await self.sio.emit("room state", state, to=sid, ignore_queue=True)

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
