"""Engine.IO v4 and Socket.IO v5 as written (issue 23), checked on chatd's own layer.

The app below mounts chatd/sio's servers the way the protocols' reference test
servers are set up: at /engine.io/ a bare EngineServer that echoes every
message, at /socket.io/ a ChatServer with an `auth` echo once connected, `message`
→ `message-back`, `message-with-ack`, and a `/custom` namespace; heartbeat 300 ms /
200 ms, maxPayload 1,000,000. The tests are written from the two specs
(engine.io-protocol README, socket.io-protocol v5): handshake, heartbeat, message
encoding, upgrade, close, and each deviation issue 23 lists, on every transport
(websocket, polling, and polling upgraded to websocket).

chatd's gate (server.py) differs from the reference server where chatd's contract
says so: an event handler gets one payload and its ack carries the handler's
result object; binary attachments are dropped (the placeholders reach the handler).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import pytest
from aiohttp import web

from chatd.metrics import Metrics
from chatd.sio.engine import EngineServer
from chatd.sio.server import ChatServer
from eio_raw import RECORD_SEPARATOR, RawConnection

PING_INTERVAL, PING_TIMEOUT, MAX_PAYLOAD = 0.3, 0.2, 1_000_000
TRANSPORTS = ("websocket", "polling", "upgraded")
SETTINGS = dict(async_mode="aiohttp", ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT, max_http_buffer_size=MAX_PAYLOAD)


ENGINE = web.AppKey("engine", EngineServer)


def protocol_app() -> web.Application:
    app = web.Application()

    eio = app[ENGINE] = EngineServer(**SETTINGS)

    async def echo(sid, data):
        await eio.send(sid, data)

    eio.on("message", echo)
    eio.attach(app, engineio_path="engine.io")

    sio = ChatServer(metrics=Metrics(), **SETTINGS)
    auths: dict[str, dict] = {}

    for namespace in ("/", "/custom"):

        async def connect(sid, environ, auth=None):
            auths[sid] = auth or {}

        async def connected(sid, namespace=namespace):  # after the CONNECT answer, as chatd's `welcome`
            await sio.emit("auth", auths.pop(sid), to=sid, namespace=namespace)

        sio.on("connect", connect, namespace=namespace)
        sio.on_connected(connected, namespace)

    async def message(sid, payload):
        await sio.emit("message-back", payload, to=sid)
        return {"ok": True}

    async def message_with_ack(sid, payload):
        return {"ok": True, "echo": payload}

    sio.events.update({"message": message, "message-with-ack": message_with_ack})
    sio.attach(app, socketio_path="socket.io")
    return app


@pytest.fixture
async def server(aiohttp_server):
    return await aiohttp_server(protocol_app())


@pytest.fixture
async def base(server) -> str:
    return f"http://127.0.0.1:{server.port}"


async def session_gone(server, sid: str, within: float = 1.0) -> bool:
    """Whether the Engine.IO session is closed on the server (its disconnect handlers ran) in time."""
    eio = server.app[ENGINE]
    deadline = time.monotonic() + within
    while sid in eio.sockets and not eio.sockets[sid].closed:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def engine(http, base, transport) -> RawConnection:
    return await RawConnection.open(http, base + "/engine.io/", transport)


async def socketio(http, base, transport, connect: str | None = "40") -> RawConnection:
    """A session on /socket.io/, CONNECTed to `/` (answer and `auth` read) unless `connect` is None."""
    conn = await RawConnection.open(http, base + "/socket.io/", transport)
    if connect is not None:
        await conn.send(connect)
        assert (await conn.recv()).startswith("40")
        assert (await conn.recv()).startswith('42["auth"')
    return conn


# -- handshake ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_handshake_opens_a_session_with_the_servers_settings(http, base, transport):
    conn = await engine(http, base, transport)
    assert set(conn.handshake) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
    assert isinstance(conn.sid, str) and conn.sid
    assert conn.handshake["upgrades"] == ([] if transport == "websocket" else ["websocket"])
    assert (conn.handshake["pingInterval"], conn.handshake["pingTimeout"]) == (300, 200)
    assert conn.handshake["maxPayload"] == MAX_PAYLOAD
    await conn.close()


@pytest.mark.parametrize("path", ["/engine.io/", "/socket.io/"])
async def test_a_bad_or_missing_query_parameter_or_method_is_400(http, base, path):
    # Item 1: `transport` is mandatory (engine.io took a request without it for polling).
    for query in ("transport=polling", "EIO=abc&transport=polling", "EIO=3&transport=polling", "EIO=4", "EIO=4&transport=abc"):
        async with http.get(f"{base}{path}?{query}") as response:
            assert response.status == 400, query
    for method in ("POST", "PUT"):
        async with http.request(method, f"{base}{path}?EIO=4&transport=polling") as response:
            assert response.status in (400, 405), method
    for query in ("transport=websocket", "EIO=abc&transport=websocket", "EIO=4"):
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(f"{base}{path}?{query}")


# -- heartbeat ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_server_pings_every_interval_and_the_session_lives_on_pongs(http, base, transport):
    conn = await engine(http, base, transport)
    conn.answer_pings = False
    started = time.monotonic()
    for _ in range(3):
        assert await conn.recv(timeout=1.0) == "2"
        assert await conn.send("3") == 200
    assert 0.5 < time.monotonic() - started < 1.5  # three intervals of 300 ms (the first began at the handshake)
    await conn.close()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_client_that_does_not_pong_is_closed_after_interval_plus_timeout(http, base, transport):
    conn = await engine(http, base, transport)
    if transport == "websocket":
        conn.answer_pings = False
        assert await conn.recv(timeout=1.0) == "2"
        assert await conn.ended(within=1.0)
    else:
        await asyncio.sleep(PING_INTERVAL + PING_TIMEOUT + 0.3)
        # The PING went unanswered (it waited in the queue): the session is gone.
        status, _ = await conn.get()
        assert status == 400


# -- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_text_and_binary_messages_are_echoed(http, base, transport):
    conn = await engine(http, base, transport)
    assert await conn.send("4hello") == 200
    assert await conn.recv() == "4hello"
    assert await conn.send(b"\x01\x02\x03\x04") == 200
    # Binary: a binary frame on a websocket, base64 ("b…") in a polling payload.
    assert await conn.recv() == (b"\x01\x02\x03\x04" if conn.on_websocket else "bAQIDBA==")
    await conn.close()


async def test_polling_batches_packets_with_the_record_separator_both_ways(http, base):
    conn = await engine(http, base, "polling")
    assert await conn.post("4test1\x1e4test2\x1ebAQIDBA==\x1e4test3") == (200, "ok")  # item 2: "ok"
    await asyncio.sleep(0.05)
    status, text = await conn.get()
    assert (status, text) == (200, "4test1\x1e4test2\x1ebAQIDBA==\x1e4test3")


# -- upgrade -----------------------------------------------------------------------------------


async def test_upgrade_from_polling_to_websocket(http, base):
    conn = await engine(http, base, "upgraded")  # probe, NOOP to the pending poll, UPGRADE: see eio_raw
    await conn.send("4hello")
    assert await conn.recv() == "4hello"
    # After the upgrade, the session takes no more HTTP requests, nor a second websocket.
    status, _ = await conn.get()
    assert status == 400
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(conn.query(transport="websocket", sid=conn.sid))
    await conn.send("4still")
    assert await conn.recv() == "4still"
    await conn.close()


# -- close (item 10) ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "upgraded"])
async def test_a_client_close_closes_the_websocket_at_once(http, base, transport):
    conn = await engine(http, base, transport)
    await conn.send("1")
    # At once: well before the read timeout (interval + timeout, 0.5 s) would end it anyway.
    assert await conn.ended(within=0.3)


async def test_a_client_close_answers_the_pending_poll_at_once_and_ends_the_session(http, base):
    conn = await engine(http, base, "polling")
    poll = asyncio.ensure_future(conn.get())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await conn.post("1") == (200, "ok")
    assert await asyncio.wait_for(poll, 1.0) == (200, "6")  # NOOP
    assert time.monotonic() - started < 1.0
    assert (await conn.get())[0] == 400


# -- sessions closed for breaking the protocol -------------------------------------------------


async def test_an_undecodable_polling_payload_is_400_and_ends_the_session(http, base, caplog):
    # Item 9 (engine.io: 200 "OK", a logged traceback, the session kept).
    caplog.set_level(logging.WARNING)
    for body in ("abc", "4ok\x1eabc", "9", "\x1e".join(["4x"] * 17)):
        conn = await engine(http, base, "polling")
        poll = asyncio.ensure_future(conn.get())
        await asyncio.sleep(0.05)
        status, _ = await conn.post(body)
        assert status == 400, body
        assert await asyncio.wait_for(poll, 1.0) == (200, "1"), body  # the pending poll learns: CLOSE
        assert (await conn.get())[0] == 400, body
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no traceback


@pytest.mark.parametrize("transport", ["websocket", "upgraded"])
@pytest.mark.parametrize("frame", ["abc", "", "9", "0", "6", "2"])
async def test_an_undecodable_or_unexpected_frame_closes_the_websocket(server, http, base, transport, frame, caplog):
    # Item 8: chatd's direct websocket dropped "abc" and stayed open; engine.io's own
    # reader (an upgraded connection) ended with a traceback and left the session open.
    caplog.set_level(logging.WARNING)
    conn = await engine(http, base, transport)
    await conn.send(frame)
    assert await conn.ended(within=0.3)
    assert await session_gone(server, conn.sid, within=0.3)
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no traceback


async def test_a_second_concurrent_poll_is_400_and_ends_the_session(http, base):
    # Item 3: engine.io kept both (and a third) waiting.
    conn = await engine(http, base, "polling")
    first = asyncio.ensure_future(conn.get())
    await asyncio.sleep(0.05)
    assert (await conn.get())[0] == 400
    assert await asyncio.wait_for(first, 1.0) == (200, "1")
    assert (await conn.get())[0] == 400


# -- Socket.IO: connect ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_connect_is_answered_first_then_the_connected_handlers_event(http, base, transport):
    # Item 7: what the app sends once a socket is accepted (here `auth`, in chatd `welcome`)
    # comes after the CONNECT answer, on every transport.
    for connect, namespace, auth in (
        ("40", "", {}),
        ('40{"token":"123"}', "", {"token": "123"}),
        ("40/custom,", "/custom,", {}),
        ('40/custom,{"token":"abc"}', "/custom,", {"token": "abc"}),
    ):
        conn = await socketio(http, base, transport, connect=None)
        await conn.send(connect)
        answer = await conn.recv()
        assert answer.startswith("40" + namespace), answer
        assert set(json.loads(answer[2 + len(namespace) :])) == {"sid"}
        assert await conn.recv() == f"42{namespace}" + json.dumps(["auth", auth], separators=(",", ":"))
        await conn.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_connect_to_an_unknown_namespace_gets_a_connect_error_object(http, base, transport):
    # Item 4: python-socketio answers `44/random,"Unable to connect"`, a string.
    conn = await socketio(http, base, transport, connect=None)
    await conn.send("40/random")
    assert await conn.recv() == '44/random,{"message":"Invalid namespace"}'
    await conn.send("40")  # the session is still good
    assert (await conn.recv()).startswith("40{")
    await conn.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_disconnect_from_a_namespace_keeps_the_others(http, base, transport):
    conn = await socketio(http, base, transport)
    await conn.send("40/custom")
    assert (await conn.recv()).startswith("40/custom,")
    assert (await conn.recv()).startswith('42/custom,["auth"')
    await conn.send("41/custom")
    await conn.send('42["message","to main"]')
    assert await conn.recv() == '42["message-back","to main"]'
    await conn.send("41")
    await conn.send('42["message","after disconnect"]')  # no longer connected to `/`: ignored
    conn.answer_pings = False
    assert await conn.recv(timeout=1.0) == "2"  # nothing but the next PING
    await conn.close()


# -- Socket.IO: messages -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_events_and_acks(http, base, transport):
    conn = await socketio(http, base, transport)
    await conn.send('42["message",{"3":[true],"2":"x"}]')
    assert await conn.recv() == '42["message-back",{"3":[true],"2":"x"}]'
    await conn.send('42456["message-with-ack",[1,"2",{"3":[false]}]]')
    assert await conn.recv() == '43456[{"ok":true,"echo":[1,"2",{"3":[false]}]}]'
    # chatd's contract: attachments are dropped and the event runs with its placeholders.
    await conn.send('451-["message",{"_placeholder":true,"num":0}]')
    await conn.send(b"\x01\x02\x03")
    assert await conn.recv() == '42["message-back",{"_placeholder":true,"num":0}]'
    await conn.close()


# Items 5, 6 and 11: what Socket.IO v5 forbids closes the connection (python-socketio
# dropped these and kept it open), before CONNECT and after it.
FORBIDDEN = {
    "unknown packet type": "4abc",
    "no such type": "47",
    "event payload an object": "42{}",
    "event payload a string": '42"message"',
    "event payload empty": "42[]",
    "event without payload": "42",
    "ack id not a number": '42abc["message-with-ack",1]',
    "cut short": '42["message",{"a":',
    "connect payload not an object": '40["x"]',
    "connect error from a client": '44{"message":"x"}',
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("connected", [False, True], ids=["before-connect", "after-connect"])
@pytest.mark.parametrize("name", list(FORBIDDEN))
async def test_a_packet_socketio_forbids_closes_the_connection(http, base, transport, connected, name):
    conn = await socketio(http, base, transport, connect="40" if connected else None)
    status = await conn.send(FORBIDDEN[name])
    assert status == (400 if transport == "polling" else 200)  # a POST that carries one: 400
    assert await conn.ended(within=1.0)
