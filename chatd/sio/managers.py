"""Client managers: who is in which room, fast local delivery, and Redis fan-out with control messages.

- `RoomIndex` keeps a sid -> rooms index beside python-socketio's room table.
  python-socketio finds a disconnecting socket's rooms by copying the
  namespace's whole room table and testing every room (`basic_disconnect`,
  `get_rooms`): O(all rooms) per disconnect, so O(N²) when thousands of
  sockets drop at once (a network blip, a restart).
- `FastBroadcastMixin` replaces `AsyncManager.emit`'s local delivery: the packet
  is encoded once, the websocket frame built once and written to every direct
  recipient's transport (engine.py), without a task per recipient; polling and
  upgraded connections get it through their queue, in call order.
- `RedisClientManager`, python-socketio's Redis manager with both of the above
  and chatd's *control messages*: things every process must do for its own
  sockets that are not an emit (end a session, order a stored chat message).
  They are JSON arrays `["chatd", host_id, name, *args]` on the same channel,
  told apart from python-socketio's own messages (JSON objects) by their first
  byte, so they keep their order with the emits.

python-socketio's pub/sub managers deliver locally by calling `super().emit`
from `AsyncPubSubManager`; with the mixin between `AsyncPubSubManager` and
`AsyncManager` in the MRO, emits received from Redis get the fast delivery too.

Private names used here are listed in chatd/sio/__init__.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

import socketio
from engineio import packet as eio_packet
from socketio import AsyncRedisManager
from socketio import packet as sio_packet

from ..tasks import TaskOwner
from .engine import EngineServer, direct_websocket, websocket_frame

log = logging.getLogger("chatd.sio")

CHANNEL = "chatd"
CONTROL_TAG = "chatd"
SUBSCRIBE_WAIT_SECONDS = 5.0
# The largest channel message read: chatd's own are a chat message or a room's
# presence change; a larger one can only come from someone else.
MAX_CHANNEL_MESSAGE = 4 * 1024 * 1024
SLICE = 500  # sockets written per event-loop turn by `emit_in_slices`: about 7 ms of writes
SOCKETIO_METHODS = frozenset({"emit", "callback", "disconnect", "enter_room", "leave_room", "close_room"})

ControlHandler = Callable[..., Awaitable[None]]


def redis_address(url: str) -> str:
    """host:port of a Redis URL, for messages: never the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


class RoomIndex:
    rooms: dict
    callbacks: dict
    pending_connect: dict
    pending_disconnect: dict

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rooms_of: dict[tuple[str, str], set] = {}  # (namespace, sid) -> rooms

    def basic_enter_room(self, sid, namespace, room, eio_sid=None):
        if room is None:  # the namespace's sid -> eio_sid map: python-socketio's bidict, whose inverse it reads
            super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        else:
            # python-socketio 5.18's `basic_enter_room` with a plain dict per room: a bidict
            # write (a duplicate check and an inverse entry, nothing reads the inverse of
            # a room) is most of a room's cost to a session in 50 rooms.
            ns = self.rooms.get(namespace)
            if eio_sid is None and ns is None:
                raise ValueError("sid is not connected to requested namespace")
            if sid != room and self.is_sid_room(namespace, room):
                raise ValueError("cannot enter a sid room")
            if ns is None:
                ns = self.rooms[namespace] = {}
            if eio_sid is None:
                eio_sid = ns[None][sid]
            members = ns.get(room)
            if members is None:
                ns[room] = {sid: eio_sid}
            else:
                members[sid] = eio_sid
        rooms = self._rooms_of.get((namespace, sid))
        if rooms is None:
            self._rooms_of[(namespace, sid)] = {room}
        else:
            rooms.add(room)

    def basic_leave_room(self, sid, namespace, room):
        ns = self.rooms.get(namespace)
        members = ns.get(room) if ns is not None else None
        if members is not None and sid in members:  # as python-socketio 5.18's, for a dict or its bidict
            del members[sid]
            if not members:
                del ns[room]
                if not ns:
                    del self.rooms[namespace]
        rooms = self._rooms_of.get((namespace, sid))
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._rooms_of[(namespace, sid)]

    def get_participants(self, namespace, room):
        """python-socketio 5.18's, for rooms that are plain dicts (and the namespace's bidict)."""
        ns = self.rooms.get(namespace, {})
        participants: dict = {}
        for name in room if hasattr(room, "__len__") and not isinstance(room, str) else (room,):
            members = ns.get(name)
            if members is not None:  # a dict merges as a copy; the sid map is a bidict
                participants.update(members if type(members) is dict else members.items())
        yield from participants.items()

    def room_size(self, namespace: str, room: str) -> int:
        """How many sockets are in a room of this process, without walking it."""
        return len(self.rooms.get(namespace, {}).get(room, ()))

    def get_rooms(self, sid, namespace):
        return [room for room in self._rooms_of.get((namespace, sid), ()) if room is not None]

    def basic_disconnect(self, sid, namespace, **kwargs):
        """python-socketio 5.18's `basic_disconnect`, with the room scan replaced by the index."""
        if namespace not in self.rooms:
            return
        for room in list(self._rooms_of.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self._rooms_of.pop((namespace, sid), None)
        if sid in self.callbacks:
            del self.callbacks[sid]
        for pending in (self.pending_connect, self.pending_disconnect):
            if namespace in pending and sid in pending[namespace]:
                pending[namespace].remove(sid)
                if len(pending[namespace]) == 0:
                    del pending[namespace]


def indexed(manager_class: type) -> type:
    """`manager_class` with each socket's rooms indexed."""
    return type(f"Indexed{manager_class.__name__}", (RoomIndex, manager_class), {})


class FastBroadcastMixin(socketio.AsyncManager):
    """`AsyncManager.emit`'s local delivery, encoding once and writing one shared frame."""

    async def emit(self, event, data, namespace, room=None, skip_sid=None, callback=None, to=None, **kwargs):
        room = to or room
        pkt = self._shared_packet(event, data, namespace) if callback is None else None
        if pkt is None:
            return await super().emit(
                event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, **kwargs
            )
        skip = set(skip_sid) if isinstance(skip_sid, list) else {skip_sid}
        # A generator, not a list: this is `new chat`'s path, to every socket of a room.
        participants = self.get_participants(namespace, room)
        await self._deliver(pkt, (eio_sid for sid, eio_sid in participants if sid not in skip))

    async def emit_in_slices(self, event: str, data, namespace: str, room: str, *, size: int = SLICE) -> None:
        """An event to every socket of a room, written `size` sockets per event-loop turn.

        For what a large room hears often and nothing else depends on the order
        of (presence): one frame to each of 5,000 sockets is about 75 ms of
        writes (a presence batch of a busy second), and written in one turn it
        would hold every other handshake and message that long. The recipients
        are the room's sockets when this is called, less those that have left
        it by their slice. Slices of one call leave in order; callers that need
        their events in order await each call before the next (presence does).
        """
        pkt = self._shared_packet(event, data, namespace)
        if pkt is None:
            return await super().emit(event, data, namespace, room=room)
        recipients = list(self.get_participants(namespace, room))
        for start in range(0, len(recipients), size):
            members = recipients[start:start + size]
            if start:
                await asyncio.sleep(0)  # the loop's other work between slices
                present = self.rooms.get(namespace, {}).get(room, {})
                members = [member for member in members if member[0] in present]
            await self._deliver(pkt, [eio_sid for _, eio_sid in members], now=True)

    def _shared_packet(self, event: str, data, namespace: str) -> eio_packet.Packet | None:
        """The Engine.IO packet every recipient gets, or None where python-socketio must deliver
        (no such namespace here, another engine, binary attachments)."""
        eio = getattr(self.server, "eio", None)
        if namespace not in self.rooms or not isinstance(eio, EngineServer):
            return None
        if isinstance(data, tuple):
            args = list(data)
        elif data is not None:
            args = [data]
        else:
            args = []
        encoded = self.server.packet_class(sio_packet.EVENT, namespace=namespace, data=[event] + args).encode()
        if isinstance(encoded, list):  # binary attachments: rare, leave them to python-socketio (as given)
            return None
        return eio_packet.Packet(eio_packet.MESSAGE, encoded)

    async def _deliver(self, pkt: eio_packet.Packet, recipients: Iterable[str], *, now: bool = False) -> None:
        """One frame, built once, to each direct websocket; the rest through their queues.

        `now`: written at once where nothing of this turn waits for the socket
        (`DirectWebSocket.write_now`), not gathered for the turn's end: for a slice
        of a large room, where each socket gets this one frame in the turn.
        """
        eio = self.server.eio
        frame = None
        queued = []
        flusher = None  # the server's, once a frame was written at once
        for eio_sid in recipients:
            socket = eio.sockets.get(eio_sid)
            ws = direct_websocket(socket)
            if ws is None:
                queued.append(eio_sid)
                continue
            if frame is None:
                frame = websocket_frame(pkt.encode())
            try:
                if now:
                    ws.write_now(frame)
                    flusher = ws.flusher
                else:
                    ws.write(frame)
            except ConnectionResetError:
                pass  # gone; its reader closes it
        if flusher is not None:
            flusher.written_at_once()
        # The rest (polling, upgraded or compressed connections) the way engine.io
        # sends: in call order, through each socket's queue, without a task each.
        for eio_sid in queued:
            await eio.send_packet(eio_sid, pkt)


class FastBroadcastManager(FastBroadcastMixin):
    """The client manager for one process."""


LocalManager = indexed(FastBroadcastManager)


# RoomIndex first (its disconnect), then the Redis manager, whose local delivery is the mixin's.
class RedisClientManager(RoomIndex, AsyncRedisManager, FastBroadcastMixin):
    """python-socketio's Redis manager with chatd's control messages and an explicit start and stop."""

    def __init__(self, url: str, *, channel: str = CHANNEL) -> None:
        super().__init__(url, channel=channel)
        self.control_handlers: dict[str, ControlHandler] = {}
        self.tasks = TaskOwner("control messages")

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
        """The channel's messages, each read once as JSON here; anything else is dropped and logged.

        Whoever can write to Redis can write to the channel. python-socketio 5.18
        reads its messages as JSON only (before 5.14 it unpickled them:
        CVE-2025-61765), but a JSON value that is not an object with a `method`
        (a bare string "method", say) raises in its pub/sub loop outside its
        handlers' guard, which then drops the subscription and subscribes again,
        losing what is published meanwhile. So only objects with a known `method`
        are passed on, already decoded (python-socketio takes a dict as it is).
        """
        async for data in super()._listen():
            message = self._decode(data)
            if isinstance(message, list):
                self._control_received(message)
            elif message is not None:
                yield message

    def _decode(self, data) -> dict | list | None:
        if not isinstance(data, bytes) or len(data) > MAX_CHANNEL_MESSAGE:
            log.warning("dropped a channel message that is not JSON text or is too large (%s bytes)",
                        len(data) if isinstance(data, (bytes, str)) else "?")  # fmt: skip
            return None
        try:
            message = self.json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            log.warning("dropped a channel message that is not JSON (%d bytes)", len(data))
            return None
        if isinstance(message, dict) and isinstance(message.get("method"), str) and message["method"] in SOCKETIO_METHODS:
            return message
        if isinstance(message, list):
            return message
        log.warning("dropped a channel message of an unknown shape (%d bytes)", len(data))
        return None

    def _control_received(self, message: list) -> None:
        if len(message) < 3 or message[0] != CONTROL_TAG or not all(isinstance(part, str) for part in message[1:3]):
            log.warning("dropped a malformed control message")
            return
        _, host_id, name, *args = message
        if host_id != self.host_id:
            # A task: the pub/sub loop must keep reading while a handler waits.
            self.tasks.spawn(self._run_control(name, args))

    async def _run_control(self, name: str, args) -> None:
        handler = self.control_handlers.get(name)
        if handler is None:
            log.warning("no handler for control message %r", name)
            return
        try:
            inspect.signature(handler).bind(*args)
        except TypeError:
            log.warning("dropped control message %r with %d arguments", name, len(args))
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
        await self.tasks.close()
        thread = getattr(self, "thread", None)
        if thread is not None:
            thread.cancel()
            await asyncio.gather(thread, return_exceptions=True)
        if self.pubsub is not None:
            await self.pubsub.aclose()
        if self.redis is not None:
            await self.redis.aclose()
