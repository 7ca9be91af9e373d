"""Engine.IO v4 and Socket.IO v5 as written (issue 23), against chatd itself.

tests/test_protocol.py checks chatd's layer on a reference-like app; here the
same deviations are checked on a real chatd with a session cookie, where chatd's
contract applies: `welcome` comes after the CONNECT answer on every transport, a
client that leaves cleanly is gone (presence, /metrics) within 1 s, what the
protocols forbid closes only that connection, and a well-formed event with a bad
payload still gets SPEC's `invalid_request`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest

from chatd.sessions import COOKIE_NAME
from conftest import Visitor
from eio_raw import RawConnection

pytestmark = pytest.mark.storage

TRANSPORTS = ("websocket", "polling", "upgraded")


@pytest.fixture
async def chatd(start_chatd) -> str:
    return await start_chatd(metrics=True)


@pytest.fixture
async def bystander(chatd):
    """A socket.io-client of chatd, in `general`."""
    visitor = Visitor(chatd)
    client = await visitor.socket()
    await client.next("welcome")
    yield client
    await visitor.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def guest_cookie(base_url: str) -> str:
    visitor = Visitor(base_url)
    try:
        await visitor.session()
        return visitor.cookie
    finally:
        await visitor.close()


async def connected(http, base_url: str, transport: str, cookie: str) -> tuple[RawConnection, dict]:
    """A raw connection with `cookie`, CONNECTed; it and its `welcome`, checked to follow the CONNECT answer."""
    conn = await RawConnection.open(http, base_url + "/socket.io/", transport, headers={"Cookie": f"{COOKIE_NAME}={cookie}"})
    await conn.send("40")
    answer = await conn.recv()
    assert answer.startswith('40{"sid":'), answer  # item 7: the CONNECT answer first…
    # …then `welcome`; the room's events may come just before it (docs/protocol.md), never before the answer.
    while (welcome := await conn.recv()).startswith(('42["new chat",', '42["presence",')):
        pass
    assert welcome.startswith('42["welcome",'), welcome
    return conn, json.loads(welcome[2:])[1]


async def sockets_connected(base_url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(base_url + "/metrics") as response:
        text = await response.text()
    return int(float(re.search(r"^chatd_sockets_connected (\S+)$", text, re.M).group(1)))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_welcome_comes_after_the_connect_answer(chatd, http, transport):
    conn, welcome = await connected(http, chatd, transport, await guest_cookie(chatd))
    assert welcome["room"] == "general" and welcome["id"]
    await conn.send('421["send chat",{"msg":"hello"}]')
    while not (packet := await conn.recv()).startswith("431"):
        pass
    assert json.loads(packet[3:])[0]["ok"] is True
    await conn.close()


@pytest.mark.parametrize("how", ["close packet", "websocket closed"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_that_leaves_is_gone_within_a_second(chatd, http, bystander, transport, how):
    # Item 10: engine.io left the connection (and so presence and the gauge) to the
    # 45 s timeouts after the client's CLOSE.
    if how == "websocket closed" and transport == "polling":
        pytest.skip("no websocket to close")
    conn, welcome = await connected(http, chatd, transport, await guest_cookie(chatd))
    await bystander.sees("general", [bystander.me, {k: welcome[k] for k in ("id", "name", "account")}])
    assert await sockets_connected(chatd) == 2
    started = time.monotonic()
    if how == "close packet":
        poll = None
        while transport == "polling" and (poll is None or poll.done()):  # until one is left pending
            poll = asyncio.ensure_future(conn.get())
            await asyncio.sleep(0.05)
        started = time.monotonic()
        await conn.send("1")
        if poll is not None:
            status, text = await asyncio.wait_for(poll, 1.0)  # the pending poll, answered at once
            assert (status, text.split("\x1e")[-1]) == (200, "6")
        else:
            assert await conn.ended(within=1.0)  # the server closes the websocket
    else:
        await conn.ws.close()
    await bystander.sees("general", [bystander.me], timeout=1.0)
    while await sockets_connected(chatd) != 1:
        assert time.monotonic() - started < 1.0
        await asyncio.sleep(0.02)
    assert time.monotonic() - started < 1.0


# What the protocols forbid: the connection closes (items 5, 6, 8, 9, 11).
FORBIDDEN = ["abc", "4abc", "42{}", '42abc["send chat",{"msg":"x"}]', "47", '44{"message":"x"}']


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_what_the_protocols_forbid_closes_only_that_connection(chatd, http, bystander, transport):
    cookie = await guest_cookie(chatd)
    for frame in FORBIDDEN:
        conn, _ = await connected(http, chatd, transport, cookie)
        status = await conn.send(frame)
        assert status == (400 if transport == "polling" else 200), frame
        assert await conn.ended(within=1.0), frame
    # And before CONNECT.
    conn = await RawConnection.open(http, chatd + "/socket.io/", transport, headers={"Cookie": f"{COOKIE_NAME}={cookie}"})
    await conn.send("4abc")
    assert await conn.ended(within=1.0)
    assert (await bystander.call("send chat", {"msg": "unaffected"}))["ok"] is True
    assert bystander.drain("chat_error") == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_well_formed_event_with_a_bad_payload_gets_invalid_request_and_stays(chatd, http, transport):
    # chatd's contract, kept: SPEC's error by ack or `chat_error`, not a close.
    conn, _ = await connected(http, chatd, transport, await guest_cookie(chatd))
    await conn.send('421["send chat",5]')
    while not (packet := await conn.recv()).startswith("431"):
        pass
    assert json.loads(packet[3:])[0]["error"] == "invalid_request"
    await conn.send('42["send chat",{"msg":7}]')
    while not (packet := await conn.recv()).startswith('42["chat_error"'):
        pass
    assert json.loads(packet[2:])[1]["error"] == "invalid_request"
    await conn.send('422["send chat",{"msg":"still here"}]')
    while not (packet := await conn.recv()).startswith("432"):
        pass
    assert json.loads(packet[3:])[0]["ok"] is True
    await conn.close()


@pytest.mark.parametrize("cookie", [True, False], ids=["session", "no-session"])
async def test_connect_to_another_namespace_gets_a_connect_error_object(chatd, http, cookie):
    # Item 4, on both of chatd's paths: a session (python-socketio's) and none (the early refusal).
    headers = {"Cookie": f"{COOKIE_NAME}={await guest_cookie(chatd)}"} if cookie else {}
    conn = await RawConnection.open(http, chatd + "/socket.io/", "websocket", headers=headers)
    await conn.send("40/random,")
    assert await conn.recv() == '44/random,{"message":"Invalid namespace"}'
    await conn.send("4abc")  # item 5 on both paths: still open, then closed by what breaks the protocol
    assert await conn.ended(within=1.0)


async def test_chatd_polling_answers_ok_refuses_a_missing_transport_and_a_second_poll(chatd, http):
    # Items 1, 2 and 3 on chatd.
    headers = {"Cookie": f"{COOKIE_NAME}={await guest_cookie(chatd)}"}
    async with http.get(chatd + "/socket.io/?EIO=4", headers=headers) as response:
        assert response.status == 400
    conn = await RawConnection.open(http, chatd + "/socket.io/", "polling", headers=headers)
    assert await conn.post("3") == (200, "ok")  # a PONG: nothing else to answer yet
    first = asyncio.ensure_future(conn.get())  # nothing to send before CONNECT: it waits
    await asyncio.sleep(0.05)
    assert (await conn.get())[0] == 400
    assert await asyncio.wait_for(first, 1.0) == (200, "1")
    assert (await conn.get())[0] == 400


async def test_nothing_comes_before_the_connect_answer_in_a_busy_room(start_chatd, http):
    # A socket enters `general` while its CONNECT is being handled: the room's `new chat`s of
    # that moment used to reach it before the CONNECT answer (18 handshakes in 40 here).
    base_url = await start_chatd(chat_rate=0)
    talker = Visitor(base_url)
    chatting = await talker.socket()
    await chatting.next("welcome")

    async def chat() -> None:
        for number in range(100_000):
            await chatting.emit("send chat", {"msg": f"m{number}"})
            await asyncio.sleep(0.002)

    task = asyncio.ensure_future(chat())
    try:
        cookie = await guest_cookie(base_url)
        for transport in ("websocket", "polling"):
            for _ in range(15):
                conn, _ = await connected(http, base_url, transport, cookie)  # checks the order
                await conn.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await talker.close()
