"""python-socketio, python-engineio, aiohttp and aiohttp-session as chatd serves them.

This package is the only part of chatd that touches those libraries' private
names (tests/test_internals.py fails on one anywhere else, and on a private
name used here that this list lacks). setup.cfg pins each library with a floor
and a ceiling, and `versions.py` refuses to start on a version outside them.
Checked against aiohttp 3.14.5, aiohttp-session 2.12.1, python-engineio 4.15.1
and python-socketio 5.18.1.

- `engine.py`: the Engine.IO server with direct websocket writes, a ping timer,
  early refusals, and sessions closed as the protocol says (`EngineSocket`).
- `managers.py`: the client managers (room index, one frame per room emit,
  Redis fan-out with chatd's control messages).
- `server.py`: the Socket.IO server's one gate for client events, strict
  decoding, and `on_connected` (what runs once the CONNECT answer is sent).
- `jsonhook.py`: the JSON hook (orjson), no private names.
- `versions.py`: the tested version ranges.

Private names used, with why, and what would replace them upstream:

| library | name | where | why | upstream replacement |
|---|---|---|---|---|
| python-engineio | `AsyncServer._async` (the driver table) | engine.py `EngineServer.__init__` | install `DirectWebSocket` as the aiohttp websocket class | a `websocket_class` option |
| python-engineio | `AsyncServer._handle_connect` | engine.py `EngineServer` | answer a websocket handshake that can only be refused without a socket or task | a pre-connect hook that may answer |
| python-engineio | `AsyncServer._handle_connect` repeated as `EngineServer._open_session`, with the `_service_task`, `_upgrades`, `_trigger_event`, `_unauthorized`, `_ok`, `_bad_request` it calls | engine.py | sockets of chatd's class (`EngineSocket`) from the start; an OPEN whose `pingInterval` is right below 1 s (**library at fault**: `int(interval + grace) * 1000` makes 0.3 s 0; upstream U1) | a `socket_class` option; the fix of U1 |
| python-engineio | `BaseServer._ok` | engine.py `EngineServer` | a POST is answered `ok`, as the protocol says (**library at fault**: `OK`; upstream U2) | the fix of U2 |
| python-engineio | `AsyncServer.handle_request` (public, overridden) | engine.py `EngineServer` | 400 for a request without `transport` (**library at fault**: taken as polling; upstream U3) | the fix of U3 |
| python-engineio | `AsyncSocket.receive`, `handle_get_request`, `handle_post_request` (public, overridden) | engine.py `EngineSocket` | close the session on an undecodable packet or payload, a packet type no client sends, a second concurrent long-poll; end the transport at the client's CLOSE (**library at fault** for all five: it ignores or logs them, and leaves a closed session's poll and websocket to their timeouts; upstream U4, U5, U6) | the fixes of U4–U6 |
| python-engineio | `AsyncSocket._websocket_handler` | engine.py `DirectWebSocket.__call__`, `DirectSocket` | read frames in the request's own task, no writer task or queue | a pluggable socket class |
| python-engineio | `AsyncSocket._send_ping` (by identity) | engine.py `EngineServer.start_background_task` | replace the task asleep per socket until its next ping by a timer | a timer-based ping scheduler |
| python-engineio | a live `AsyncSocket`'s `__class__` swapped to `DirectSocket`; its `queue`, `connected`, `upgraded`, `last_ping` | engine.py | the same socket object, written to directly | a pluggable socket class |
| python-engineio | aiohttp driver `WebSocket._sock`, `handler.__self__` | engine.py `DirectWebSocket` | reach aiohttp's `WebSocketResponse` and the engine.io socket | public accessors |
| python-socketio | `AsyncServer._engineio_server_class` | server.py `ChatServer` | serve chatd's `EngineServer` | an `engineio_server_class` option |
| python-socketio | `AsyncServer._handle_eio_message` | server.py | close the connection on an undecodable packet, a CONNECT_ERROR or unknown type, a CONNECT payload that is no object, an EVENT payload that is no non-empty array (**library at fault**: it raises into engine.io, which logs it, or ignores it; upstream U7); drop binary attachments instead of buffering them | stricter decoding upstream (U7) |
| python-socketio | `AsyncServer._handle_event`, `_handle_disconnect`, `_send_packet` | server.py | one gate for every event: reserved names ignored, acks when asked, never a raise | an event middleware hook |
| python-socketio | `AsyncServer._handle_connect` (wrapped), `handlers`, `namespace_handlers`, `namespaces` | server.py `ChatServer` | v5's CONNECT_ERROR object for an unknown namespace (**library at fault**: a bare string; upstream U8); `on_connected` handlers run once the CONNECT answer is sent, so `welcome` follows it; what the socket's rooms broadcast while its connect handler runs is held back (engine.py `EngineSocket.hold`) | the fix of U8; an "after connect" hook |
| python-socketio | `AsyncServer._send_packet` (wrapped) | server.py `ChatServer` | a CONNECT answer goes before what was held, a CONNECT_ERROR drops it (**library at fault**: a socket is in its rooms, and gets their events, before its CONNECT answer; upstream U9) | U9 |
| python-socketio | `BaseManager.rooms` layout (`rooms[namespace][room]` bidict), `callbacks`, `pending_connect`, `pending_disconnect`; `basic_enter_room`, `basic_leave_room` and `get_participants` (public, overridden) | managers.py `RoomIndex` | a disconnect costs the socket's own rooms, not every room; every room but the namespace's sid map (`None`, whose inverse python-socketio reads) is a plain dict, a third of the cost of a bidict write, so a session in 50 rooms enters and leaves them in about a third of the time | an indexed manager upstream; rooms as plain dicts |
| python-socketio | `AsyncPubSubManager._publish`, `_listen` | managers.py `RedisClientManager` | control messages on the same channel, in order with the emits | a documented hook for extra messages |
| aiohttp | `StreamResponse._send_headers_immediately` | engine.py | the 101's headers leave in one write with engine.io's OPEN packet | none needed: a latency nicety |

Upstream issues to open (their text is in the report of issue 23): U1 engine.io OPEN
`pingInterval` truncated below a second; U2 POST answered `OK`, not `ok`; U3 missing
`transport` served as polling; U4 an undecodable packet or payload leaves the session open
(a polling POST gets 200 and a logged traceback); U5 a second concurrent long-poll is
served instead of closing the session; U6 the client's CLOSE leaves the pending long-poll
and the websocket open until their timeouts; U7 python-socketio: undecodable packets,
non-array EVENT payloads and bad ack ids leave the connection open; U8 python-socketio:
CONNECT_ERROR for an unknown namespace is a string, not `{"message": …}`; U9 python-socketio:
room events reach a socket that a connect handler put in a room before its CONNECT answer. Also found:
`handle_request` fails with UnboundLocalError (HTTP 500) when a POST's EngineIOError
finds its session already gone (part of U4).

Also relied on (public names, internal behaviour): `AsyncManager.emit`'s
signature and that pub/sub managers deliver locally through `super().emit`
(the MRO of `RedisClientManager`), aiohttp's `StreamWriter.send_headers` and
`drain`, that engine.io makes each socket's queue with `server.create_queue()`
and that `asyncio.Queue.put`/`get` go through `put_nowait`/`get_nowait`
(engine.py `BoundedQueue` counts what waits for a slow reader there).
tests/test_internals.py checks each of these shapes against the installed
versions.
"""
