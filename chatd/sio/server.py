"""The Socket.IO server: one gate for every client event, and chatd's Engine.IO server underneath.

Private names used here are listed in chatd/sio/__init__.py.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import socketio
from socketio import packet

from ..metrics import Metrics
from ..validation import EventError
from .engine import INVALID_NAMESPACE, EngineServer
from .jsonhook import OrjsonForSocketIO

log = logging.getLogger("chatd.sio")

Handler = Callable[[str, object], Awaitable[dict]]
Connected = Callable[[str], Awaitable[None]]


def well_formed(pkt) -> bool:
    """Whether a decoded packet is one Socket.IO v5 lets a client send, its payload the right shape.

    A CONNECT's payload is absent or an object; an EVENT's a non-empty array. A
    CONNECT_ERROR, or a type beyond BINARY_ACK, never comes from a client.
    """
    if pkt.packet_type == packet.CONNECT:
        return pkt.data is None or isinstance(pkt.data, dict)
    if pkt.packet_type in (packet.EVENT, packet.BINARY_EVENT):
        return isinstance(pkt.data, list) and len(pkt.data) > 0
    return pkt.packet_type in (packet.DISCONNECT, packet.ACK, packet.BINARY_ACK)


class ChatServer(socketio.AsyncServer):
    """An AsyncServer whose client events all pass one gate.

    python-socketio hands an event named `connect` or `disconnect` to the
    server's own handlers, and hides whether the client asked for an ack. This
    gate only dispatches the events in `self.events`, so reserved and unknown
    names are ignored; it acks when the client asked, else reports a failure
    as `chat_error`; and nothing a handler raises escapes it.
    """

    def __init__(self, *, metrics: Metrics, websocket_compression: bool = False, **kwargs) -> None:
        super().__init__(json=OrjsonForSocketIO, websocket_compression=websocket_compression, **kwargs)
        self.events: dict[str, Handler] = {}
        self.metrics = metrics
        self._refusals: dict[str, str] = {}
        self.eio.on_cut_off = metrics.connection_closed_slow  # a slow reader closed (engine.py)
        # namespace -> what runs once a socket's CONNECT answer is sent (see `on_connected`)
        self.connected_handlers: dict[str, Connected] = {}

    def on_connected(self, handler: Connected, namespace: str = "/") -> None:
        """Run `handler(sid)` once a socket of `namespace` is accepted and its CONNECT answer sent.

        What a socket must receive first (`welcome`) is sent from here, not from the
        connect handler: python-socketio sends the CONNECT answer only after that
        handler returns, and the protocol wants it before any event.
        """
        self.connected_handlers[namespace] = handler

    def _engineio_server_class(self):
        return EngineServer  # direct websocket writes, see engine.py

    async def _handle_eio_message(self, eio_sid, data):
        """Decode one Socket.IO packet and dispatch it; one the protocol forbids closes the connection.

        python-socketio's own version lets decoding errors (JSON nested too deep,
        an integer of thousands of digits, an unknown packet type, an ack id that
        is no number) escape into Engine.IO, which logs a traceback for each and
        keeps the connection, ignores an EVENT whose payload is no array, and
        buffers binary attachments for as long as a client keeps sending them.
        Socket.IO v5 says such a connection is closed (`well_formed`). chatd's events
        carry JSON only: a binary event is dispatched at once with its
        placeholders in place of the bytes (so its payload is `invalid_request`,
        or the bytes sit in a field that is ignored), and attachments are dropped.
        """
        if not isinstance(data, str):
            return  # a binary attachment
        try:
            pkt = self.packet_class(encoded_packet=data)
        except Exception:  # the protocol says close: there is no telling what the client meant
            pkt = None
        if pkt is None or not well_formed(pkt):
            log.debug("closing %s: a packet the protocol forbids", eio_sid)
            await self.eio.refuse_input(eio_sid)
            return
        if pkt.packet_type == packet.CONNECT:
            await self._handle_connect(eio_sid, pkt.namespace, pkt.data)
        elif pkt.packet_type == packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, pkt.namespace, self.reason.CLIENT_DISCONNECT)
        elif pkt.packet_type in (packet.EVENT, packet.BINARY_EVENT):
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        # ACK, BINARY_ACK: chatd never asks a client for an ack, so these are dropped unanswered.

    async def _handle_connect(self, eio_sid, namespace, data):
        """python-socketio's, with v5's CONNECT_ERROR for a namespace nobody serves (an object,
        where python-socketio sends a string), and the `on_connected` handler run once the
        CONNECT answer is sent."""
        namespace = namespace or "/"
        served = namespace in self.handlers or namespace in self.namespace_handlers
        served = served or self.namespaces == "*" or namespace in self.namespaces
        if not served or self.manager.sid_from_eio_sid(eio_sid, namespace) is not None:
            # (A CONNECT to a namespace the client is in already gets the same answer.)
            error = INVALID_NAMESPACE if not served else {"message": "Already connected"}
            pkt = self.packet_class(packet.CONNECT_ERROR, data=error, namespace=namespace)
            await self._send_packet(eio_sid, pkt)
            return
        # The connect handler enters rooms (chatd: `general`) before python-socketio answers
        # the CONNECT; what they broadcast meanwhile is held back (`_send_packet`).
        self.eio.hold(eio_sid)
        try:
            await super()._handle_connect(eio_sid, namespace, data)
        finally:
            self.eio.unhold(eio_sid)  # the CONNECT answer released it, else it is dropped
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        connected = self.connected_handlers.get(namespace)
        if connected is not None and sid is not None and self.manager.is_connected(sid, namespace):
            try:
                await connected(sid)
            except Exception:
                log.exception("the connected handler of %s failed", namespace)

    async def _send_packet(self, eio_sid, pkt):
        """python-socketio's; a CONNECT answer goes before what was held while it was made
        (see `_handle_connect`), which follows it; a CONNECT_ERROR drops it (a refused socket
        gets no room's events)."""
        if pkt.packet_type not in (packet.CONNECT, packet.CONNECT_ERROR):
            return await super()._send_packet(eio_sid, pkt)
        held = self.eio.unhold(eio_sid)
        await super()._send_packet(eio_sid, pkt)
        if pkt.packet_type == packet.CONNECT:
            await self.eio.send_held(eio_sid, held)

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

    def encoded_refusal(self, *args) -> str:
        """The CONNECT_ERROR packet (encoded) of `ConnectionRefusedError(*args)`; one per reason, made once."""
        key = repr(args)  # the reasons' arguments are small literals
        encoded = self._refusals.get(key)
        if encoded is None:
            refused = socketio.exceptions.ConnectionRefusedError(*args)
            encoded = self._refusals[key] = self.packet_class(packet.CONNECT_ERROR, data=refused.error_args).encode()
        return encoded

    def eio_sid(self, sid: str) -> str | None:
        """The Engine.IO connection of a Socket.IO socket (namespace `/`)."""
        return self.manager.eio_sid_from_sid(sid, "/")

    async def send_text(self, sid: str, parts) -> None:
        """Send a Socket.IO packet already encoded as `parts` of UTF-8 text (see EngineServer.send_text)."""
        eio_sid = self.eio_sid(sid)
        if eio_sid is not None:
            await self.eio.send_text(eio_sid, parts)
