"""The core: one encrypted cookie shared by HTTP and Socket.IO, durable chat (issue 2)."""

from __future__ import annotations

import asyncio
import base64
import json
from http.cookies import SimpleCookie

import aiohttp
import pytest
from cryptography.fernet import Fernet, InvalidToken

from chatd.sessions import COOKIE_NAME
from conftest import RawSocket, Visitor, connect_socket, refusal

pytestmark = pytest.mark.storage

MESSAGE_FIELDS = {"id": int, "room": str, "name": str, "msg": str, "ts": float, "rev": int, "mentions": list}


def assert_message(message: dict, *, msg: str, name: str, room: str = "general") -> None:
    assert set(message) == {*MESSAGE_FIELDS, "account", "edited"}
    assert message["edited"] is None or isinstance(message["edited"], float)
    for key, kind in MESSAGE_FIELDS.items():
        assert isinstance(message[key], kind), (key, message)
    assert message["account"] is None or isinstance(message["account"], str)
    assert (message["msg"], message["name"], message["room"]) == (msg, name, room)


# -- the cookie ------------------------------------------------------------------


async def test_first_page_view_sets_a_guest_cookie_with_spec_attributes(base_url, secret_key):
    async with aiohttp.ClientSession() as http, http.get(base_url + "/") as response:
        assert response.status == 200
        assert (await response.text()).lower().startswith("<!doctype html")
        set_cookie = response.headers.getall("Set-Cookie")
    assert len(set_cookie) == 1
    header = set_cookie[0]
    morsel = SimpleCookie(header)[COOKIE_NAME]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["path"] == "/"
    assert morsel["max-age"] == "604800"
    assert "secure" not in header.lower()

    # The name is in the cookie, but only for the key's holder.
    token = morsel.value
    plain = json.loads(Fernet(secret_key).decrypt(token.encode()))
    name = plain["session"]["name"]
    assert name.startswith("guest-") and len(name) == len("guest-0000") and name[6:].isdigit()
    assert len(base64.urlsafe_b64decode(plain["session"]["sid"] + "==")) * 8 >= 128
    assert plain["session"]["account"] is None
    assert name not in token and name.encode() not in base64.urlsafe_b64decode(token + "==")
    with pytest.raises(InvalidToken):
        Fernet(Fernet.generate_key()).decrypt(token.encode())


async def test_secure_cookie_flag_marks_the_cookie_secure(start_chatd):
    url = await start_chatd(secure_cookie=True)
    async with aiohttp.ClientSession() as http, http.get(url + "/api/session") as response:
        morsel = SimpleCookie(response.headers["Set-Cookie"])[COOKIE_NAME]
    assert morsel["secure"] is True


async def test_session_route_reports_the_same_identity_while_the_cookie_lasts(visitors):
    visitor = await visitors()
    first = await visitor.session()
    assert set(first) == {"name", "account", "expires_at"}
    assert first["account"] is None and isinstance(first["expires_at"], int)
    assert await visitor.session() == first  # using a session does not extend it


async def test_healthz(base_url):
    async with aiohttp.ClientSession() as http, http.get(base_url + "/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_static_files_and_missing_ones(base_url):
    async with aiohttp.ClientSession() as http:
        async with http.get(base_url + "/static/vendor/socket.io.min.js") as response:
            assert response.status == 200
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(base_url + "/static/no-such-file.js") as response:
            assert response.status == 404


# -- the handshake ----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_socket_with_the_cookie_gets_welcome_with_the_same_name(visitors, transport):
    visitor = await visitors()
    session = await visitor.session()
    socket = await visitor.socket(transport=transport)
    welcome = await socket.next("welcome")
    assert welcome["name"] == session["name"]
    assert welcome["account"] is None
    assert welcome["expires_at"] == session["expires_at"]
    assert welcome["room"] == "general"
    assert welcome["history"] == []
    assert welcome["online"] == [{"id": welcome["id"], "name": session["name"], "account": None}]


async def test_send_chat_reaches_every_client_in_the_room_and_is_acked_with_its_id(visitors):
    alice, bob = await visitors(), await visitors()
    alice_socket = await alice.socket()
    bob_socket = await bob.socket(transport="polling")
    alice_name = (await alice_socket.next("welcome"))["name"]
    await bob_socket.next("welcome")

    ack = await alice_socket.call("send chat", {"msg": "  hello, world  "})
    assert ack == {"ok": True, "id": ack["id"], "rev": ack["rev"]} and isinstance(ack["id"], int)
    assert isinstance(ack["rev"], int)
    for socket in (alice_socket, bob_socket):
        message = await socket.next("new chat")
        assert_message(message, msg="hello, world", name=alice_name)
        assert message["id"] == ack["id"]

    second = await bob_socket.call("send chat", {"msg": "hi", "room": "general"})
    assert second["id"] > ack["id"]


async def test_refused_handshakes_carry_the_reason(base_url, visitors, secret_key):
    visitor = await visitors()
    await visitor.session()
    good = visitor.cookie

    def unauthorized(reason: str) -> dict:
        return {"message": "unauthorized", "data": {"reason": reason}}

    assert await refusal(base_url, cookie=None) == unauthorized("no_session")
    assert await refusal(base_url, cookie="garbage") == unauthorized("invalid_session")
    middle = len(good) // 2
    tampered = good[:middle] + ("A" if good[middle] != "A" else "B") + good[middle + 1 :]
    assert await refusal(base_url, cookie=tampered) == unauthorized("invalid_session")
    plain = Fernet(secret_key).decrypt(good.encode())
    foreign = Fernet(Fernet.generate_key()).encrypt(plain).decode()
    assert await refusal(base_url, cookie=foreign) == unauthorized("invalid_session")

    # The untouched cookie still works: the refusals were about the cookies, not the server.
    socket = await connect_socket(base_url, cookie=good)
    assert (await socket.next("welcome"))["name"] == (await visitor.session())["name"]
    await socket.close()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_handshake_from_a_foreign_origin_is_refused_before_the_session_is_read(visitors, base_url, transport):
    visitor = await visitors()
    await visitor.session()
    foreign = {"Origin": "http://evil.example"}
    # Refused by Engine.IO itself: no Socket.IO connect_error is ever sent.
    assert await refusal(base_url, cookie=visitor.cookie, transport=transport, headers=foreign) is None
    same = {"Origin": base_url}
    socket = await connect_socket(base_url, cookie=visitor.cookie, transport=transport, headers=same)
    await socket.next("welcome")
    await socket.close()


async def test_allow_origin_admits_that_origin_only(start_chatd):
    url = await start_chatd(allow_origins=("https://chat.example.org",))
    visitor = Visitor(url)
    try:
        await visitor.session()
        allowed = {"Origin": "https://chat.example.org"}
        socket = await connect_socket(url, cookie=visitor.cookie, headers=allowed)
        await socket.next("welcome")
        await socket.close()
        other = {"Origin": "https://other.example.org"}
        assert await refusal(url, cookie=visitor.cookie, headers=other) is None
    finally:
        await visitor.close()


# -- durability and keys -------------------------------------------------------------


async def test_restart_keeps_sessions_and_acked_messages(start_chatd, data_dir):
    url = await start_chatd()
    visitor = Visitor(url)
    socket = await visitor.socket()
    name = (await socket.next("welcome"))["name"]
    ids = [(await socket.call("send chat", {"msg": f"before restart {i}"}))["id"] for i in range(3)]
    cookie = visitor.cookie
    await visitor.close()

    # A second chatd on the same data dir and key: a restart, as far as storage and cookies go.
    url = await start_chatd()
    socket = await connect_socket(url, cookie=cookie)
    welcome = await socket.next("welcome")
    await socket.close()
    assert welcome["name"] == name
    assert [m["id"] for m in welcome["history"]] == ids
    assert [m["msg"] for m in welcome["history"]] == [f"before restart {i}" for i in range(3)]


async def test_key_rotation_first_key_encrypts_all_keys_decrypt(start_chatd):
    k1, k2 = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    old = Visitor(await start_chatd(secret_keys=(k1,)))
    name = (await old.session())["name"]
    cookie = old.cookie
    await old.close()

    rotated_url = await start_chatd(secret_keys=(k2, k1))
    socket = await connect_socket(rotated_url, cookie=cookie)
    assert (await socket.next("welcome"))["name"] == name
    await socket.close()
    new = Visitor(rotated_url)
    await new.session()
    Fernet(k2).decrypt(new.cookie.encode())  # new cookies are made with the first key
    await new.close()

    retired_url = await start_chatd(secret_keys=(k2,))
    assert await refusal(retired_url, cookie=cookie) == {"message": "unauthorized", "data": {"reason": "invalid_session"}}


# -- bad input ----------------------------------------------------------------------

BAD_SEND_CHAT = [
    ("not an object: string", "hello", "invalid_request"),
    ("not an object: list", ["hello"], "invalid_request"),
    ("not an object: number", 42, "invalid_request"),
    ("not an object: null", None, "invalid_request"),
    ("not an object: true", True, "invalid_request"),
    ("msg missing", {}, "invalid_request"),
    ("msg null", {"msg": None}, "invalid_request"),
    ("msg a number", {"msg": 5}, "invalid_request"),
    ("msg a list", {"msg": ["a"]}, "invalid_request"),
    ("msg an object", {"msg": {"a": 1}}, "invalid_request"),
    ("msg a boolean", {"msg": True}, "invalid_request"),
    ("room a number", {"msg": "hi", "room": 1}, "invalid_request"),
    ("wrong type beats bad value", {"msg": "", "room": 1}, "invalid_request"),
    ("msg empty", {"msg": ""}, "invalid_message"),
    ("msg only white space", {"msg": " \n\t "}, "invalid_message"),
    ("msg too long", {"msg": "x" * 2001}, "invalid_message"),
    ("room with capitals", {"msg": "hi", "room": "General"}, "invalid_room"),
    ("room with a trailing newline", {"msg": "hi", "room": "general\n"}, "invalid_room"),
    ("room empty", {"msg": "hi", "room": ""}, "invalid_room"),
    ("room too long", {"msg": "hi", "room": "a" * 33}, "invalid_room"),
    ("room starting with a dash", {"msg": "hi", "room": "-x"}, "invalid_room"),
    ("room not joined", {"msg": "hi", "room": "elsewhere"}, "not_in_room"),
]


@pytest.fixture
async def two_chatting(visitors):
    """A sender and a bystander, both in general."""
    sender, bystander = await visitors(), await visitors()
    sender_socket, bystander_socket = await sender.socket(), await bystander.socket()
    await sender_socket.next("welcome")
    await bystander_socket.next("welcome")
    # Settle: both see both of them, and no presence event is pending.
    for socket in (sender_socket, bystander_socket):
        while len(socket.members()) < 2:
            await socket.next("presence")
    await asyncio.sleep(0.1)  # longer than a small room's batching window
    for socket in (sender_socket, bystander_socket):
        socket.drain("presence")
    return sender_socket, bystander_socket


@pytest.mark.parametrize("case,payload,code", BAD_SEND_CHAT, ids=[c[0] for c in BAD_SEND_CHAT])
async def test_bad_send_chat_gets_its_code_by_ack_and_by_chat_error(two_chatting, case, payload, code):
    sender, bystander = two_chatting
    ack = await sender.call("send chat", payload)
    assert ack["ok"] is False and ack["error"] == code, ack
    assert isinstance(ack["message"], str) and ack["message"]

    await sender.emit("send chat", payload)
    error = await sender.next("chat_error")
    assert error["event"] == "send chat" and error["error"] == code and error["message"]

    # Nothing was sent, and both clients still chat.
    ack = await sender.call("send chat", {"msg": "still here"})
    assert ack["ok"] is True
    for socket in (sender, bystander):
        assert (await socket.next("new chat"))["msg"] == "still here"
        socket.drain("new chat")
    assert sender.drain("chat_error") == []


async def test_a_2000_character_message_is_accepted(two_chatting):
    sender, bystander = two_chatting
    text = "é" * 2000
    assert (await sender.call("send chat", {"msg": text}))["ok"] is True
    assert (await bystander.next("new chat"))["msg"] == text


async def test_lone_surrogate_is_invalid_message_by_ack_and_chat_error(visitors, base_url):
    visitor = await visitors()
    await visitor.session()
    bystander = await (await visitors()).socket()
    await bystander.next("welcome")
    raw, connected = await RawSocket.connect(base_url, visitor.cookie)
    try:
        assert connected.startswith("40")
        await raw.send('421["send chat",{"msg":"a\\ud800b"}]')
        ack = json.loads((await raw.recv_event("431"))[3:])[0]
        assert ack["ok"] is False and ack["error"] == "invalid_message"
        await raw.send('42["send chat",{"msg":"\\udfff"}]')
        event = json.loads((await raw.recv_event('42["chat_error"'))[2:])
        assert event[1]["error"] == "invalid_message" and event[1]["event"] == "send chat"
        await raw.send('422["send chat",{"msg":"fine"}]')
        assert json.loads((await raw.recv_event("432"))[3:])[0]["ok"] is True
    finally:
        await raw.close()
    assert (await bystander.next("new chat"))["msg"] == "fine"


async def test_reserved_and_unknown_event_names_are_ignored(two_chatting, visitors):
    sender, bystander = two_chatting
    for name in ("connect", "disconnect", "connect_error", "disconnecting", "welcome", "new chat", "no such event"):
        await sender.emit(name, {"msg": "x", "name": "admin"})
    # A reserved name with an ack gets no answer at all: it never reaches a handler.
    with pytest.raises(Exception):
        await sender.call("connect", {"name": "admin"}, timeout=0.5)
    await sender.nothing("welcome", wait=0.2)
    await bystander.nothing("presence", wait=0)
    assert sender.sio.connected and bystander.sio.connected
    ack = await sender.call("send chat", {"msg": "who am i"})
    message = await bystander.next("new chat")
    assert message["id"] == ack["id"] and message["name"].startswith("guest-")
    assert sender.drain("chat_error") == []


async def test_an_oversize_frame_closes_only_that_connection(visitors, base_url, two_chatting):
    sender, bystander = two_chatting
    visitor = await visitors()
    await visitor.session()
    raw, connected = await RawSocket.connect(base_url, visitor.cookie)
    try:
        assert connected.startswith("40")
        await raw.send('42["send chat",{"msg":"' + "x" * (65 * 1024) + '"}]')
        assert await raw.recv_event("never") == ""  # closed by the server
    finally:
        await raw.close()
    # Polling: the POST that carries it gets 400, and the long poll that a client
    # always keeps open learns that the connection is closed.
    async with aiohttp.ClientSession(cookies={COOKIE_NAME: visitor.cookie}) as http:
        async with http.get(base_url + "/socket.io/?EIO=4&transport=polling") as response:
            sid = json.loads((await response.text())[1:])["sid"]
        poll_url = base_url + f"/socket.io/?EIO=4&transport=polling&sid={sid}"

        async def long_poll() -> str:
            async with http.get(poll_url) as response:
                return await response.text()

        poll = asyncio.create_task(long_poll())
        await asyncio.sleep(0.1)
        body = '42["send chat",{"msg":"' + "x" * (65 * 1024) + '"}]'
        async with http.post(poll_url, data=body, timeout=aiohttp.ClientTimeout(total=5)) as response:
            assert response.status == 400
        assert await asyncio.wait_for(poll, 5) == "1"  # Engine.IO CLOSE
    ack = await sender.call("send chat", {"msg": "unaffected"})
    assert ack["ok"] is True
    assert (await bystander.next("new chat"))["msg"] == "unaffected"
