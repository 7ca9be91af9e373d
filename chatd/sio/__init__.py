"""python-socketio, python-engineio, aiohttp and aiohttp-session as chatd serves them.

This package is the only part of chatd that touches those libraries' private
names (tests/test_internals.py fails on one anywhere else, and on a private
name used here that this list lacks). setup.cfg pins each library with a floor
and a ceiling, and `versions.py` refuses to start on a version outside them.
Checked against aiohttp 3.14.5, aiohttp-session 2.12.1, python-engineio 4.15.1
and python-socketio 5.18.1.

- `engine.py`: the Engine.IO server with direct websocket writes, a ping timer
  and early refusals.
- `managers.py`: the client managers (room index, one frame per room emit,
  Redis fan-out with chatd's control messages).
- `server.py`: the Socket.IO server's one gate for client events.
- `jsonhook.py`: the JSON hook (orjson), no private names.
- `versions.py`: the tested version ranges.

Private names used, with why, and what would replace them upstream:

| library | name | where | why | upstream replacement |
|---|---|---|---|---|
| python-engineio | `AsyncServer._async` (the driver table) | engine.py `EngineServer.__init__` | install `DirectWebSocket` as the aiohttp websocket class | a `websocket_class` option |
| python-engineio | `AsyncServer._handle_connect` | engine.py `EngineServer` | answer a websocket handshake that can only be refused without a socket or task | a pre-connect hook that may answer |
| python-engineio | `AsyncSocket._websocket_handler` | engine.py `DirectWebSocket.__call__`, `DirectSocket` | read frames in the request's own task, no writer task or queue | a pluggable socket class |
| python-engineio | `AsyncSocket._send_ping` (by identity) | engine.py `EngineServer.start_background_task` | replace the task asleep per socket until its next ping by a timer | a timer-based ping scheduler |
| python-engineio | a live `AsyncSocket`'s `__class__` swapped to `DirectSocket`; its `queue`, `connected`, `upgraded`, `last_ping` | engine.py | the same socket object, written to directly | a pluggable socket class |
| python-engineio | aiohttp driver `WebSocket._sock`, `handler.__self__` | engine.py `DirectWebSocket` | reach aiohttp's `WebSocketResponse` and the engine.io socket | public accessors |
| python-socketio | `AsyncServer._engineio_server_class` | server.py `ChatServer` | serve chatd's `EngineServer` | an `engineio_server_class` option |
| python-socketio | `AsyncServer._handle_eio_message` | server.py | drop undecodable packets and binary attachments instead of raising or buffering | stricter decoding upstream |
| python-socketio | `AsyncServer._handle_event`, `_handle_connect`, `_handle_disconnect`, `_send_packet` | server.py | one gate for every event: reserved names ignored, acks when asked, never a raise | an event middleware hook |
| python-socketio | `BaseManager.rooms` layout (`rooms[namespace][room]` bidict), `callbacks`, `pending_connect`, `pending_disconnect` | managers.py `RoomIndex` | a disconnect costs the socket's own rooms, not every room | an indexed manager upstream |
| python-socketio | `AsyncPubSubManager._publish`, `_listen` | managers.py `RedisClientManager` | control messages on the same channel, in order with the emits | a documented hook for extra messages |
| aiohttp | `StreamResponse._send_headers_immediately` | engine.py | the 101's headers leave in one write with engine.io's OPEN packet | none needed: a latency nicety |

Also relied on (public names, internal behaviour): `AsyncManager.emit`'s
signature and that pub/sub managers deliver locally through `super().emit`
(the MRO of `RedisClientManager`), aiohttp's `StreamWriter.send_headers` and
`drain`, that engine.io makes each socket's queue with `server.create_queue()`
and that `asyncio.Queue.put`/`get` go through `put_nowait`/`get_nowait`
(engine.py `BoundedQueue` counts what waits for a slow reader there).
tests/test_internals.py checks each of these shapes against the installed
versions.
"""
