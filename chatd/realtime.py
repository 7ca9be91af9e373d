"""The Socket.IO side: handshake auth from the session cookie, chat events, rooms, presence.

How the cookie reaches the socket: python-socketio runs on the same aiohttp
app, so the Engine.IO handshake is an ordinary aiohttp request that passes
through aiohttp-session's middleware. The connect handler takes that request
from the socket's environ (`environ["aiohttp.request"]`) and reads the session
with `sessions.read_session`, exactly as an HTTP handler does. The identity it
finds is fixed for the socket's lifetime.

Every broadcast goes through python-socketio rooms: `room:<name>` for chat
rooms and `session:<sha256 of sid>` for all sockets of one session, so that a Redis
client manager can carry them across processes. `new chat` is the exception: a
stored message is handed once to every process's sequencer (ordering.py), which
emits it to that process's sockets only, in id order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import orjson
import socketio
from aiohttp import web
from socketio import packet

from .broadcast import EngineServer, FastBroadcastManager, direct_websocket
from .fanout import RedisClientManager
from .limits import ChatRateLimiter
from .metrics import Metrics
from .ordering import Sequencer
from .presence import Member, Presence, Publish
from .presence.published import Snapshot
from .sessions import Identity, read_session
from .socketrooms import indexed
from .storage import OUTAGE_RETRY_AFTER, Storage, StorageError
from .validation import DEFAULT_ROOM, EventError, parse_history, parse_room, parse_send_chat

log = logging.getLogger("chatd.realtime")

# One process: fast local delivery (one frame for a whole room), each socket's rooms indexed.
LocalManager = indexed(FastBroadcastManager)

MAX_FRAME_BYTES = 64 * 1024
MAX_ROOMS_PER_SOCKET = 20
WELCOME_HISTORY = 50
# A session's socket whose client ignores `session_ended` has its transport closed this much later.
SESSION_END_GRACE_SECONDS = 0.5
# How long an ending waits for a socket still in its handshake to finish it.
HANDSHAKE_WAIT_SECONDS = 5.0

Handler = Callable[[str, object], Awaitable[dict]]


class OrjsonForSocketIO:
    """python-socketio's `json=` hook: orjson for speed.

    Both directions fall back to the standard library for what orjson refuses
    (a lone surrogate in a string, an integer beyond 64 bits): decoding, so
    that such a payload reaches validation and gets its error code instead of
    being dropped unanswered; encoding, so that an emit never raises. (The hook
    is python-socketio's class-wide `Packet.json`, so it also encodes for any
    Socket.IO client in the same process.)
    """

    @staticmethod
    def dumps(obj, **_kwargs) -> str:
        try:
            return orjson.dumps(obj, default=_as_fragment).decode("utf-8")
        except TypeError:  # orjson.JSONEncodeError included
            return json.dumps(obj, separators=(",", ":"), default=_as_parsed)

    @staticmethod
    def loads(text, **_kwargs):
        # orjson reads an integer beyond 64 bits as a float; the standard library
        # keeps it an integer, so such an id is the same type whatever else the
        # payload holds. Only a run of 19+ digits can be one.
        if not _LONG_DIGITS.search(text):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                pass
        return json.loads(text)


_LONG_DIGITS = re.compile(r"[0-9]{19}")


class JsonText:
    """JSON encoded ahead (an online list), put into a packet as it is."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _as_fragment(obj):
    if isinstance(obj, JsonText):
        return orjson.Fragment(obj.text)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _as_parsed(obj):
    if isinstance(obj, JsonText):
        return json.loads(obj.text)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def chat_room(name: str) -> str:
    return "room:" + name


def session_room(sid: str) -> str:
    # A digest, not the sid: session endings name this room to every process over Redis.
    return "session:" + hashlib.sha256(sid.encode("utf-8")).hexdigest()


@dataclass(slots=True)
class SocketState:
    user: Identity
    rooms: set[str] = field(default_factory=set)
    expiry: asyncio.TimerHandle | None = None


class ChatServer(socketio.AsyncServer):
    """An AsyncServer whose client events all pass one gate.

    python-socketio hands an event named `connect` or `disconnect` to the
    server's own handlers, and hides whether the client asked for an ack. This
    gate only dispatches the events in `self.events`, so reserved and unknown
    names are ignored; it acks when the client asked, else reports a failure
    as `chat_error`; and nothing a handler raises escapes it.
    """

    def __init__(self, *, metrics: Metrics, **kwargs) -> None:
        super().__init__(**kwargs)
        self.events: dict[str, Handler] = {}
        self.metrics = metrics

    def _engineio_server_class(self):
        return EngineServer  # direct websocket writes, see broadcast.py

    async def _handle_eio_message(self, eio_sid, data):
        """Decode one Socket.IO packet and dispatch it; a packet that cannot be read is dropped.

        python-socketio's own version lets decoding errors (JSON nested too deep,
        an integer of thousands of digits, an unknown packet type) escape into
        Engine.IO, which logs a traceback for each, and it buffers binary
        attachments for as long as a client keeps sending them. chatd's events
        carry JSON only: a binary event is dispatched at once with its
        placeholders in place of the bytes (so its payload is `invalid_request`,
        or the bytes sit in a field that is ignored), and attachments are dropped.
        """
        if not isinstance(data, str):
            return  # a binary attachment
        try:
            pkt = self.packet_class(encoded_packet=data)
        except Exception:
            log.debug("dropped an undecodable packet from %s", eio_sid, exc_info=True)
            return
        if pkt.packet_type == packet.CONNECT:
            await self._handle_connect(eio_sid, pkt.namespace, pkt.data)
        elif pkt.packet_type == packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, pkt.namespace, self.reason.CLIENT_DISCONNECT)
        elif pkt.packet_type in (packet.EVENT, packet.BINARY_EVENT):
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        # ACK, BINARY_ACK, CONNECT_ERROR, unknown types: chatd never asks a client
        # for an ack, so these can only be noise, and are dropped unanswered.

    async def _handle_event(self, eio_sid, namespace, id, data):  # noqa: A002 (python-socketio's name)
        namespace = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if sid is None or not self.manager.is_connected(sid, namespace):
            return
        if not isinstance(data, list) or not data or not isinstance(data[0], str) or data[0] not in self.events:
            return
        event = data[0]
        try:
            result = await self.events[event](sid, data[1] if len(data) > 1 else None)
        except EventError as exc:
            result = {"ok": False, "error": exc.code, "message": exc.message, **exc.extra}
        except Exception:
            log.exception("event %r failed", event)
            result = {"ok": False, "error": "internal_error", "message": "The server could not do that; try again."}
        if not result.get("ok"):
            self.metrics.event_error(result["error"])
        try:
            if id is not None:
                await self._send_packet(eio_sid, self.packet_class(packet.ACK, namespace=namespace, id=id, data=[result]))
            elif not result.get("ok"):
                error = {k: v for k, v in result.items() if k != "ok"}
                await self.emit("chat_error", {"event": event, **error}, to=sid, namespace=namespace)
        except Exception:  # the client may be gone already
            log.debug("could not answer %r", event, exc_info=True)


class Realtime:
    """The chat behaviour on top of ChatServer: connect, disconnect, events, session endings."""

    def __init__(
        self,
        *,
        storage: Storage,
        presence: Callable[[Publish], Presence],
        rate_limiter: ChatRateLimiter,
        origin_allowed: Callable[[str | None, web.Request], bool],
        metrics: Metrics | None = None,
        client_manager: socketio.AsyncManager | None = None,
        websocket_compression: bool = False,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.storage = storage
        self.presence = presence(self._publish_presence)
        self.rate_limiter = rate_limiter
        self.sockets: dict[str, SocketState] = {}
        # Every `new chat` reaches this process's sockets through the sequencer: once each, in id order.
        self.sequencer = Sequencer(storage, self._deliver_chat)
        self.sio = ChatServer(
            async_mode="aiohttp",
            # Either way each socket's rooms are indexed: disconnect storms cost each socket's rooms, not all rooms.
            client_manager=client_manager or LocalManager(),
            json=OrjsonForSocketIO,
            max_http_buffer_size=MAX_FRAME_BYTES,
            # A callable, never []: an empty list would switch engine.io's origin check off.
            cors_allowed_origins=lambda origin, environ: origin_allowed(origin, environ["aiohttp.request"]),
            cors_credentials=True,
            async_handlers=False,
            metrics=self.metrics,
            websocket_compression=websocket_compression,  # permessage-deflate only when asked for
        )
        self.sio.eio.early_refusal = self._early_refusal
        self._refusals: dict[str | None, str] = {}
        # With several processes, a session ending is a control message every process acts on.
        self.cluster = client_manager if isinstance(client_manager, RedisClientManager) else None
        if self.cluster is not None:
            self.cluster.on_control("end_session", self.end_local_session)
            self.cluster.on_control("chat", self._chat_published)
        self.sio.on("connect", self.on_connect)
        self.sio.on("disconnect", self.on_disconnect)
        self.sio.events.update(
            {"send chat": self.send_chat, "join": self.join, "leave": self.leave, "history": self.history}
        )

    def attach(self, app: web.Application) -> None:
        self.sio.attach(app, socketio_path="socket.io")

    # -- connection ---------------------------------------------------------

    async def on_connect(self, sid: str, environ: dict, auth=None) -> None:
        try:
            await self._connect(sid, environ)
        except socketio.exceptions.ConnectionRefusedError:
            raise
        except Exception as exc:
            # Refused with a reason rather than left without an answer. A refused socket gets
            # no disconnect event, so what the handshake had done (rooms, presence, timer) is undone here.
            if isinstance(exc, StorageError):
                log.warning("storage is unreachable; refusing a handshake")
                refusal = ("unavailable", {"retry_after": OUTAGE_RETRY_AFTER})
            else:
                if not isinstance(exc, ConnectionError):  # a client gone mid-handshake needs no traceback
                    log.exception("a handshake failed")
                refusal = ("internal_error",)
            try:
                await self.on_disconnect(sid)
            except Exception:
                log.exception("could not undo a failed handshake")
            self.metrics.handshake_refused(refusal[0])
            raise socketio.exceptions.ConnectionRefusedError(*refusal) from None

    async def _connect(self, sid: str, environ: dict) -> None:
        session = await read_session(environ["aiohttp.request"])
        user = session.user
        if user is None:
            self.metrics.handshake_refused(session.rejected)
            raise socketio.exceptions.ConnectionRefusedError("unauthorized", {"reason": session.rejected})
        # Join the session's room first, then look at revocation again: a logout that
        # lands between reading the cookie and joining is then seen either here or by
        # `end_local_session`, which finds this socket in the room.
        await self.sio.enter_room(sid, session_room(user.sid))
        if await self.storage.is_revoked(user.sid):
            self.metrics.handshake_refused("revoked")
            raise socketio.exceptions.ConnectionRefusedError("unauthorized", {"reason": "revoked"})
        state = self.sockets[sid] = SocketState(user=user)
        state.expiry = asyncio.get_running_loop().call_later(
            max(0.0, user.expires_at - time.time()), self._expire_soon, sid
        )
        history, online = await self._enter(sid, state, DEFAULT_ROOM)
        self.metrics.handshake_accepted()
        welcome = {"id": user.member_id, **user.public(), "room": DEFAULT_ROOM, "history": history}
        await self._send_welcome(sid, welcome, online)

    async def _early_refusal(self, environ: dict) -> str | None:
        """The CONNECT_ERROR `on_connect` would give a websocket handshake, found before it starts (broadcast.py)."""
        session = await read_session(environ["aiohttp.request"])
        if session.user is not None:
            return None
        return self.refusal(session.rejected)

    def refusal(self, reason: str) -> str:
        """Count a handshake refused for `reason`; the CONNECT_ERROR (encoded) that tells its client."""
        self.metrics.handshake_refused(reason)
        encoded = self._refusals.get(reason)
        if encoded is None:  # one per reason, made once
            refused = socketio.exceptions.ConnectionRefusedError("unauthorized", {"reason": reason})
            encoded = self._refusals[reason] = self.sio.packet_class(
                packet.CONNECT_ERROR, data=refused.error_args
            ).encode()
        return encoded

    async def on_disconnect(self, sid: str, reason=None) -> None:
        state = self.sockets.pop(sid, None)
        if state is None:
            return
        if state.expiry is not None:
            state.expiry.cancel()
        member = state.user.presence_member()
        for room in state.rooms:
            await self.presence.leave(room, sid, member)
        await self._release_rooms(sid, state.rooms)

    async def _send_welcome(self, sid: str, welcome: dict, online: Snapshot) -> None:
        """Emit `welcome` with its `online` list spliced in as the JSON presence keeps.

        In a room of thousands that list is most of the packet (~60 bytes a
        member): it is neither parsed, encoded nor copied here. The packet
        (`2["welcome",{…}]`, namespace `/`) goes to a direct websocket as pieces
        of one frame, the list's pieces being slices of presence's cached bytes,
        so the 5,000th handshake costs about what the first does.
        """
        head = OrjsonForSocketIO.dumps(welcome).encode("utf-8")  # {"id":…,"history":[…]}
        parts = (b'2["welcome",', memoryview(head)[:-1], b',"online":', *online.parts, b"}]")
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        ws = direct_websocket(self.sio.eio.sockets.get(eio_sid))
        if ws is not None:
            ws.write_text((b"4", *parts))  # "4": an Engine.IO MESSAGE
        else:  # polling, or compressed: through Engine.IO
            await self.sio.eio.send(eio_sid, b"".join(parts).decode("utf-8"))

    async def _enter(self, sid: str, state: SocketState, room: str) -> tuple[list[dict], Snapshot]:
        """Join a chat room: its latest history and its online list (JSON text, encoded ahead).

        The socket enters the Socket.IO room before the list is read, so every
        `presence` event published after that list reaches it too.
        """
        state.rooms.add(room)
        # The history stops where this socket's live `new chat`s start (ordering.py).
        watermark = await self.sequencer.enter(room, lambda: self.sio.enter_room(sid, chat_room(room)))
        member = state.user.presence_member()
        await self.presence.join(room, sid, member)
        history = await self._history_until(room, watermark)
        return history, await self.presence.snapshot(room, member)

    async def _publish_presence(self, room: str, joins: list[Member], leaves: list[Member]) -> None:
        """One `presence` event to this process's sockets of a room: with several processes, each
        computes its own sockets' events from Redis's stream of changes (presence/redis.py)."""
        event = {"room": room, "joins": joins, "leaves": leaves}
        await self.sio.emit("presence", event, room=chat_room(room), ignore_queue=True)

    async def _history_until(self, room: str, watermark: int | None) -> list[dict]:
        """The latest messages up to `watermark`, the last id this process delivered to the room."""
        if watermark is None:  # not ordered here (cannot be, for a room a socket is in): the latest
            return await self.storage.history(room, limit=WELCOME_HISTORY)
        if watermark == 0:
            return []
        return await self.storage.history(room, before=watermark + 1, limit=WELCOME_HISTORY)

    async def _release_rooms(self, sid: str, rooms) -> None:
        """Rooms where no other socket of this process is left stop being ordered here."""
        for room in list(rooms):

            def unused(room: str = room) -> bool:  # `sid` itself is still listed while it disconnects
                # The room's size, not a walk through it: a storm of N disconnects stays O(N).
                members = self.sio.manager.rooms.get("/", {}).get(chat_room(room), ())
                return len(members) == 0 or (len(members) == 1 and sid in members)

            await self.sequencer.forget(room, unused)

    # -- new chat: stored, then ordered and delivered on every process ------------------------

    async def _publish_chat(self, message: dict) -> None:
        """Hand a stored message to every process's sequencer, this one's included."""
        if self.cluster is not None:
            await self.cluster.publish_control("chat", message)
        else:
            await self._chat_published(message)

    async def _chat_published(self, message: dict) -> None:
        # Rooms without a socket here are not ordered here: the next join starts them from storage.
        if isinstance(message, dict) and self.sequencer.tracks(message.get("room")):
            await self.sequencer.receive(message)

    async def _deliver_chat(self, message: dict) -> None:
        """The sequencer's output: to this process's sockets in the room only (every process runs one)."""
        await self.sio.emit("new chat", message, room=chat_room(message["room"]), ignore_queue=True)

    def online_counts(self) -> tuple[int, int, int]:
        """For metrics: sockets, rooms with a socket, and sessions with a socket, on this process."""
        states = self.sockets.values()
        rooms = set().union(*(state.rooms for state in states))
        return len(self.sockets), len(rooms), len({state.user.sid for state in states})

    # -- session endings ----------------------------------------------------

    async def end_session(self, session_id: str, reason: str) -> None:
        """End a session's sockets on every process (the caller has revoked it already)."""
        room = session_room(session_id)
        if self.cluster is not None:
            await self.cluster.publish_control("end_session", room, reason)
        else:
            await self.end_local_session(room, reason)

    async def end_local_session(self, room: str, reason: str) -> None:
        """Tell this process's sockets in a session's room that it ended, then disconnect them.

        A socket still in its handshake (in the session's room, connect handler not
        done) is ended as soon as it is connected; one whose client ignores the
        disconnect has its transport closed by the server a moment later.
        """
        for sid, eio_sid in list(self.sio.manager.get_participants("/", room)):
            if self.sio.manager.is_connected(sid, "/"):
                await self._end_socket(sid, eio_sid, reason)
            else:
                asyncio.ensure_future(self._end_after_handshake(sid, eio_sid, reason))

    async def _end_after_handshake(self, sid: str, eio_sid: str, reason: str) -> None:
        deadline = time.monotonic() + HANDSHAKE_WAIT_SECONDS
        while self.sio.manager.is_pre_connected(sid, "/") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.sio.manager.is_connected(sid, "/"):  # else the handshake was refused or dropped
            await self._end_socket(sid, eio_sid, reason)

    async def _end_socket(self, sid: str, eio_sid: str, reason: str) -> None:
        await self.sio.emit("session_ended", {"reason": reason}, to=sid, ignore_queue=True)
        await self.sio.disconnect(sid, ignore_queue=True)
        asyncio.get_running_loop().call_later(
            SESSION_END_GRACE_SECONDS, lambda: asyncio.ensure_future(self._close_transport(eio_sid))
        )

    async def _close_transport(self, eio_sid: str) -> None:
        """Close an Engine.IO connection now, whatever its client does (as `close_all` does)."""
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is not None:
            await socket.close(wait=False)
            socket.queue.put_nowait(None)

    def _expire_soon(self, sid: str) -> None:
        asyncio.ensure_future(self._expire(sid))

    async def _expire(self, sid: str) -> None:
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        if sid in self.sockets and eio_sid is not None:
            await self._end_socket(sid, eio_sid, "expired")

    async def close_all(self) -> None:
        """On shutdown: close every transport, so clients see the server go and reconnect later.

        An Engine.IO close, not a Socket.IO disconnect: clients treat the former as a
        dropped connection and reconnect by themselves. Never waiting for a socket's
        queue to drain (engine.io's own `disconnect()` does, and hangs for good on a
        socket whose client left as shutdown began), and ending each writer ourselves:
        the browser client ignores Engine.IO's CLOSE on a websocket and waits for the
        server to close it, which the writer does when it ends.
        """
        for socket in list(self.sio.eio.sockets.values()):
            await socket.close(wait=False)  # sends CLOSE, runs the disconnect handlers
            socket.queue.put_nowait(None)  # ends the writer, which closes a websocket
        await self.presence.close()  # nobody is left to tell

    # -- events -------------------------------------------------------------

    def _joined(self, sid: str, room: str) -> SocketState:
        state = self.sockets[sid]
        if room not in state.rooms:
            raise EventError("not_in_room", f"Join '{room}' first.")
        return state

    async def send_chat(self, sid: str, payload) -> dict:
        command = parse_send_chat(payload)
        user = self._joined(sid, command.room).user
        wait = await self.rate_limiter.take(user.sid)
        if wait > 0:
            raise EventError(
                "rate_limited", "You are sending too fast; wait a moment.", retry_after=round(wait + 0.0005, 3)
            )
        message = await self.storage.add_message(command.room, user.name, user.account, command.msg, time.time())
        self.metrics.message_stored()
        await self._publish_chat(message)
        return {"ok": True, "id": message["id"]}

    async def join(self, sid: str, payload) -> dict:
        room = parse_room(payload)
        state = self.sockets[sid]
        if room not in state.rooms and len(state.rooms) >= MAX_ROOMS_PER_SOCKET:
            raise EventError("too_many_rooms", f"A connection can be in at most {MAX_ROOMS_PER_SOCKET} rooms.")
        if room in state.rooms:  # already live here: a history up to what it was sent
            history = await self._history_until(room, self.sequencer.watermark(room))
            online = await self.presence.snapshot(room, state.user.presence_member())
        else:
            history, online = await self._enter(sid, state, room)
        # The list goes into the ack as the text presence keeps, not re-encoded.
        return {"ok": True, "room": room, "history": history, "online": JsonText(online.text)}

    async def leave(self, sid: str, payload) -> dict:
        room = parse_room(payload)
        state = self._joined(sid, room)
        state.rooms.discard(room)
        await self.sio.leave_room(sid, chat_room(room))
        await self.presence.leave(room, sid, state.user.presence_member())
        await self._release_rooms(sid, [room])
        return {"ok": True}

    async def history(self, sid: str, payload) -> dict:
        query = parse_history(payload)
        self._joined(sid, query.room)
        messages = await self.storage.history(query.room, before=query.before, after=query.after, limit=query.limit)
        return {"ok": True, "messages": messages}
