"""Fast delivery (chatd/sio/engine.py, chatd/sio/managers.py) against real clients: order on every transport,
compression only when asked for, no task per idle socket, pings and timeouts."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from chatd.sessions import COOKIE_NAME
from chatd.web import REALTIME, create_app

from conftest import SocketClient


async def guest_cookie(http: aiohttp.ClientSession, base_url: str) -> str:
    async with http.get(base_url + "/api/session") as response:
        return response.cookies[COOKIE_NAME].value


async def raw_socket(http: aiohttp.ClientSession, base_url: str, cookie: str, **kwargs):
    """A websocket speaking Engine.IO/Socket.IO by hand, connected to namespace `/`."""
    ws = await http.ws_connect(
        base_url + "/socket.io/?EIO=4&transport=websocket", headers={"Cookie": f"{COOKIE_NAME}={cookie}"}, **kwargs
    )
    assert (await ws.receive_str()).startswith("0{")
    await ws.send_str("40")
    seen = []
    while not any(s.startswith("40") for s in seen) or not any(s.startswith('42["welcome"') for s in seen):
        seen.append(await asyncio.wait_for(ws.receive_str(), 3))
    return ws


async def test_every_transport_gets_every_message_once_in_order(start_chatd, visitors):
    base_url = await start_chatd(chat_rate=0)
    sender = await visitors(base_url)
    websocket = await sender.socket()
    polling = await (await visitors(base_url)).socket(transport="polling")
    upgraded = SocketClient()  # the browser's default: polling first, then an upgrade
    viewer = await visitors(base_url)
    await viewer.session()
    await upgraded.sio.connect(
        base_url, headers={"Cookie": f"{COOKIE_NAME}={viewer.cookie}"}, transports=["polling", "websocket"]
    )
    viewer.sockets.append(upgraded)
    await upgraded.next("welcome")
    for _ in range(50):  # let the upgrade finish before the burst
        if upgraded.sio.eio.current_transport == "websocket":
            break
        await asyncio.sleep(0.05)
    assert upgraded.sio.eio.current_transport == "websocket"

    acks = await asyncio.gather(*(websocket.call("send chat", {"msg": f"m{i}"}) for i in range(40)))
    assert [a for a in acks if not a["ok"]] == []
    sent = sorted(a["id"] for a in acks)
    for client in (websocket, polling, upgraded):
        got = [(await client.next("new chat"))["id"] for _ in sent]
        assert got == sent  # each exactly once, in increasing id order
        await client.nothing("new chat", wait=0.1)


async def test_lone_messages_and_bursts_mixed_arrive_once_in_order(start_chatd, visitors):
    """A quiet server writes a turn's first frame at once, a busy one holds frames to the
    turn's end (DirectWebSocket.write): either way, and switching between them, nothing
    is lost, doubled or reordered."""
    base_url = await start_chatd(chat_rate=0)
    sender = await (await visitors(base_url)).socket()
    receivers = [await (await visitors(base_url)).socket() for _ in range(3)]
    ids = []
    for round_ in range(6):
        ids.append((await sender.call("send chat", {"msg": f"lone {round_}"}))["id"])
        await asyncio.sleep(0.02)  # quiet again
        burst = await asyncio.gather(*(sender.call("send chat", {"msg": f"b{round_}.{i}"}) for i in range(15)))
        ids.extend(a["id"] for a in burst)
        await asyncio.sleep(0.02)
    ids.sort()
    for client in (sender, *receivers):
        got = [(await client.next("new chat"))["id"] for _ in ids]
        assert got == ids
        await client.nothing("new chat", wait=0.1)


async def test_compression_only_when_asked_for(start_chatd):
    for asked in (False, True):
        base_url = await start_chatd(websocket_compression=asked)
        async with aiohttp.ClientSession() as http:
            cookie = await guest_cookie(http, base_url)
            ws = await raw_socket(http, base_url, cookie, compress=15)  # offers permessage-deflate
            assert bool(ws.compress) is asked
            await ws.send_str('420["send chat",{"msg":"squeeze me"}]')
            frames = [await asyncio.wait_for(ws.receive_str(), 3) for _ in range(2)]
            assert any(f.startswith('42["new chat"') and "squeeze me" in f for f in frames)
            assert any(f.startswith('430[{"ok":true') for f in frames)
            await ws.close()


async def test_an_idle_websocket_keeps_no_task_of_its_own(base_url):
    # engine.io's own socket adds a writer task, a task for the frame it awaits and a
    # ping task to every websocket; a direct socket adds none to aiohttp's own.
    async with aiohttp.ClientSession() as http:
        cookie = await guest_cookie(http, base_url)
        await (await raw_socket(http, base_url, cookie)).close()  # first-use costs out of the way
        await asyncio.sleep(0.1)
        before = len(asyncio.all_tasks())
        sockets = [await raw_socket(http, base_url, cookie) for _ in range(20)]
        await asyncio.sleep(0.2)
        # aiohttp's two per connection (its connection loop and the request handler), nothing else.
        assert len(asyncio.all_tasks()) - before <= 2 * 20
        for ws in sockets:
            await ws.close()


@pytest.fixture
async def quick_pings(aiohttp_server, make_config):
    """A chatd whose Engine.IO pings every 0.2 s and gives up 0.3 s later."""
    app = create_app(make_config())
    eio = app[REALTIME].sio.eio
    eio.ping_interval, eio.ping_timeout = 0.2, 0.3
    server = await aiohttp_server(app)
    return str(server.make_url("/")).rstrip("/")


async def test_pings_keep_an_answering_client_and_close_a_silent_one(quick_pings):
    async with aiohttp.ClientSession() as http:
        cookie = await guest_cookie(http, quick_pings)
        answering = await raw_socket(http, quick_pings, cookie)
        silent = await raw_socket(http, quick_pings, cookie)
        pings = 0
        while pings < 4:  # several ping cycles, each answered
            frame = await asyncio.wait_for(answering.receive_str(), 2)
            if frame == "2":
                pings += 1
                await answering.send_str("3")
        assert not answering.closed
        # The silent one got its ping, never answered, and was closed by the server.
        frames = []
        while True:
            msg = await asyncio.wait_for(silent.receive(), 2)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            frames.append(msg.data)
        assert "2" in frames
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        await answering.close()


async def test_a_refused_websocket_gets_open_then_connect_error_and_leaves_nothing_behind(aiohttp_server, make_config):
    app = create_app(make_config())
    server = await aiohttp_server(app)
    base_url = str(server.make_url("/")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        cookie = await guest_cookie(http, base_url)
        tampered = cookie[:-8] + ("A" if cookie[-8] != "A" else "B") + cookie[-7:]
        for sent, reason in ((None, "no_session"), (tampered, "invalid_session")):
            headers = {"Cookie": f"{COOKIE_NAME}={sent}"} if sent else {}
            async with http.ws_connect(base_url + "/socket.io/?EIO=4&transport=websocket", headers=headers) as ws:
                assert (await ws.receive_str()).startswith('0{"sid":')
                await ws.send_str("40/elsewhere,")
                assert await ws.receive_str() == '44/elsewhere,{"message":"Invalid namespace"}'  # v5: an object
                await ws.send_str("40")
                assert await ws.receive_str() == (
                    '44{"message":"unauthorized","data":{"reason":"%s"}}' % reason
                )
        assert app[REALTIME].sio.eio.sockets == {}
