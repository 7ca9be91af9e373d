"""Rooms that follow the person (issue 20): a session's rooms kept by the server, every
socket of it in all of them, read markers and RoomState, mentions and typing — over
real sockets to a real chatd (SQLite, or PostgreSQL with CHATD_TEST_BACKEND=postgres).
Across processes: tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from conftest import SocketClient, Visitor
from test_presence import connect_many

pytestmark = pytest.mark.storage

WITHIN = 1.0  # SPEC: a join/leave reaches the session's other sockets within 1 s


def room_state(room: str, last_id: int, read_id: int, unread: int = 0, mentions: int = 0) -> dict:
    return {"room": room, "last_id": last_id, "read_id": read_id, "unread": unread, "mentions": mentions}


async def tab(visitor: Visitor) -> tuple[SocketClient, dict]:
    socket = await visitor.socket()
    return socket, await socket.next("welcome")


async def send(socket: SocketClient, room: str, text: str) -> int:
    ack = await socket.call("send chat", {"room": room, "msg": text})
    assert ack["ok"] is True, ack
    return ack["id"]


async def login(visitor: Visitor, username: str) -> None:
    status, body = await visitor.post("/api/login", {"username": username, "password": "correct horse"})
    assert status == 200, body


# -- rooms kept by the server --------------------------------------------------------


async def test_a_new_session_is_in_general_and_its_welcome_lists_its_rooms(visitors):
    talker, _ = await tab(await visitors())
    await send(talker, "general", "before")
    await asyncio.sleep(0.15)  # the talker's arrival is published
    socket, welcome = await tab(await visitors())
    # Joining is not missing anything: general is read up to its last message.
    assert welcome["room"] == "general" and welcome["rooms"] == [room_state("general", 1, 1)]
    assert welcome["online_count"] == len(welcome["online"]) == 2
    for room in ("zeta", "alpha", "mid"):
        ack = await socket.call("join", {"room": room})
        assert ack["ok"] is True and ack["online_count"] == 1


async def test_welcome_lists_every_room_of_the_session_sorted_by_name(visitors):
    guest = await visitors()
    socket, _ = await tab(guest)
    for room in ("zeta", "alpha", "mid"):
        assert (await socket.call("join", {"room": room}))["ok"] is True
    await send(socket, "mid", "hello")
    _, welcome = await tab(guest)
    assert welcome["rooms"] == [
        room_state("alpha", 0, 0), room_state("general", 0, 0), room_state("mid", 1, 1), room_state("zeta", 0, 0)
    ]  # fmt: skip


async def test_a_join_or_leave_by_one_tab_reaches_every_tab_of_the_session_and_no_one_else(visitors):
    guest = await visitors()
    tab1, _ = await tab(guest)
    tab2, _ = await tab(guest)
    other, _ = await tab(await visitors())

    started = time.monotonic()
    ack = await tab1.call("join", {"room": "side"})
    assert ack["ok"] is True and ack["topic"] == ""
    assert await tab2.next("joined", timeout=WITHIN) == {"room": "side"}
    assert time.monotonic() - started < WITHIN
    await tab1.nothing("joined", wait=0.1)  # the tab that joined has its ack
    await other.nothing("joined", wait=0.1)
    # tab2 is in the room already: it gets its messages, and may ask for its snapshot.
    sent = await send(tab1, "side", "to both tabs")
    assert (await tab2.next("new chat"))["id"] == sent
    snapshot = await tab2.call("join", {"room": "side"})
    assert snapshot["online"] == [tab1.me] and snapshot["history"][-1]["id"] == sent
    await tab2.nothing("joined", wait=0.1)  # asking again changed nothing
    # A third tab opened now is in side from the start.
    tab3, welcome = await tab(guest)
    assert [r["room"] for r in welcome["rooms"]] == ["general", "side"]

    assert await tab2.call("leave", {"room": "side"}) == {"ok": True}
    for socket in (tab1, tab3):
        assert await socket.next("left", timeout=WITHIN) == {"room": "side", "reason": "left"}
    for socket in (tab1, tab2, tab3):
        assert (await socket.call("send chat", {"room": "side", "msg": "x"}))["error"] == "not_in_room"
        assert (await socket.call("read", {"room": "side", "id": 1}))["error"] == "not_in_room"
    await other.nothing("left", wait=0.1)


async def test_leaving_general_keeps_the_session_out_of_it_on_its_next_socket(visitors):
    guest = await visitors()
    first, _ = await tab(guest)
    assert (await first.call("join", {"room": "elsewhere"}))["ok"] is True
    assert await first.call("leave", {"room": "general"}) == {"ok": True}
    second, welcome = await tab(guest)
    assert welcome["room"] is None and welcome["history"] == [] and welcome["online"] == []
    assert welcome["online_count"] == 0 and [r["room"] for r in welcome["rooms"]] == ["elsewhere"]
    assert (await second.call("send chat", {"msg": "hi"}))["error"] == "not_in_room"
    # Out of every room: still a session, in no room.
    assert await second.call("leave", {"room": "elsewhere"}) == {"ok": True}
    _, empty = await tab(guest)
    assert empty["rooms"] == [] and empty["room"] is None


async def test_an_accounts_rooms_and_unread_counts_follow_it_to_another_device_and_across_a_restart(
    start_chatd, visitors
):
    """Acceptance 2: three rooms joined on one device, with the right unread counts on another
    device, and after a restart."""
    url = await start_chatd()
    phone = await visitors(url)
    await phone.register("alice")
    phone_socket, _ = await tab(phone)
    for room in ("books", "cats", "dogs"):
        assert (await phone_socket.call("join", {"room": room}))["ok"] is True
    bob = await visitors(url)
    await bob.register("bob")
    bob_socket, _ = await tab(bob)
    for room in ("books", "cats"):
        assert (await bob_socket.call("join", {"room": room}))["ok"] is True
    for text in ("one", "two", "three"):
        await send(bob_socket, "books", text)
    await send(bob_socket, "cats", "@alice look")
    own = await send(phone_socket, "dogs", "alice's own message is not unread")
    expected = [
        room_state("books", 3, 0, unread=3),
        room_state("cats", 1, 0, unread=1, mentions=1),
        room_state("dogs", own, own),
        room_state("general", 0, 0),
    ]

    laptop = await visitors(url)
    await login(laptop, "alice")
    laptop_socket, welcome = await tab(laptop)
    assert welcome["rooms"] == expected
    # Another device of the account: a join there reaches this one.
    assert (await laptop_socket.call("join", {"room": "eels"}))["ok"] is True
    assert await phone_socket.next("joined", timeout=WITHIN) == {"room": "eels"}
    assert await laptop_socket.call("leave", {"room": "eels"}) == {"ok": True}
    assert await phone_socket.next("left", timeout=WITHIN) == {"room": "eels", "reason": "left"}
    for visitor in (phone, bob, laptop):
        await visitor.close()

    again = await start_chatd()  # a second server on the same storage: what a restart finds
    tablet = await visitors(again)
    await login(tablet, "alice")
    _, welcome = await tab(tablet)
    assert welcome["rooms"] == expected


# -- read markers ---------------------------------------------------------------------------


async def test_read_moves_the_marker_forward_and_the_sessions_other_tabs_follow(visitors):
    writer, _ = await tab(await visitors())
    assert (await writer.call("join", {"room": "r"}))["ok"] is True
    reader = await visitors()
    tab1, _ = await tab(reader)
    tab2, _ = await tab(reader)
    stranger, _ = await tab(await visitors())
    assert (await tab1.call("join", {"room": "r"}))["ok"] is True
    assert (await stranger.call("join", {"room": "r"}))["ok"] is True
    ids = [await send(writer, "r", f"m{i}") for i in range(5)]

    ack = await tab1.call("read", {"room": "r", "id": ids[2]})
    assert ack == {"ok": True, **room_state("r", 5, 3, unread=2)}
    assert await tab2.next("room state", timeout=WITHIN) == room_state("r", 5, 3, unread=2)
    await tab1.nothing("room state", wait=0.05)
    # Never back, and an id past the last message counts as the last one.
    assert await tab2.call("read", {"room": "r", "id": 1}) == {"ok": True, **room_state("r", 5, 3, unread=2)}
    await tab1.nothing("room state", wait=0.1)  # it did not move: nobody is told
    assert await tab2.call("read", {"room": "r", "id": 10**12}) == {"ok": True, **room_state("r", 5, 5)}
    assert await tab1.next("room state") == room_state("r", 5, 5)
    # A guest's marker is its session's: the stranger's is where it was.
    assert (await stranger.call("join", {"room": "r"}))["unread"] == 5

    for bad in ({"room": "r", "id": 0}, {"room": "r", "id": -3}, {"room": "r"}, {"room": "r", "id": "1"}, [], None):
        assert (await tab1.call("read", bad))["error"] == "invalid_request", bad
    assert (await tab1.call("read", {"room": "R!", "id": 1}))["error"] == "invalid_room"
    assert (await tab1.call("read", {"room": "nowhere", "id": 1}))["error"] == "not_in_room"

    # Sending moves the sender's marker to its message; its other tabs are told.
    mine = await send(tab2, "r", "mine")
    assert await tab1.next("room state") == room_state("r", mine, mine)
    assert (await tab1.call("join", {"room": "r"}))["read_id"] == mine


async def test_an_accounts_marker_is_shared_by_all_its_sessions(visitors):
    one = await visitors()
    await one.register("carol")
    two = await visitors()
    await login(two, "carol")
    first, _ = await tab(one)
    second, _ = await tab(two)
    writer, _ = await tab(await visitors())
    message = await send(writer, "general", "news")
    await first.call("read", {"room": "general", "id": message})
    assert await second.next("room state", timeout=WITHIN) == room_state("general", message, message)


# -- mentions -------------------------------------------------------------------------------


async def test_mentions_name_existing_accounts_canonically_once_in_order(visitors):
    for name in ("Amy", "bob.b", "c-d"):
        await (await visitors()).register(name)
    guest, welcome = await tab(await visitors())
    text = "@bob.b, hi @AMY and @amy! mail@amy x@c-d (@c-d) @nobody @guest-1234 thanks @amy."
    message_id = await send(guest, "general", text)
    message = await guest.next("new chat")
    assert message["id"] == message_id and message["mentions"] == ["bob.b", "Amy", "c-d"]
    assert (await guest.call("history", {"room": "general"}))["messages"][-1]["mentions"] == ["bob.b", "Amy", "c-d"]
    plain = await send(guest, "general", "no one here")
    assert (await guest.next("new chat"))["mentions"] == [] and plain
    # Guests cannot be mentioned, even by their name.
    await send(guest, "general", f"@{welcome['name']}")
    assert (await guest.next("new chat"))["mentions"] == []


async def test_mentions_stop_at_20_and_count_in_the_mentioned_accounts_room_state(visitors):
    names = [f"user{i:02d}" for i in range(21)]
    for name in names[:-1]:
        await (await visitors()).register(name)
    mentioned = await visitors()
    await mentioned.register(names[-1])
    reader, _ = await tab(mentioned)
    sender, _ = await tab(await visitors())
    for socket in (reader, sender):
        assert (await socket.call("join", {"room": "pings"}))["ok"] is True
    await send(sender, "pings", " ".join(f"@{n}" for n in reversed(names)))
    assert (await sender.next("new chat"))["mentions"] == list(reversed(names))[:20]
    await send(sender, "pings", "@user00 only")
    await send(sender, "pings", "@USER20 again")
    await send(sender, "pings", "nothing")
    state = await reader.call("join", {"room": "pings"})
    assert (state["last_id"], state["read_id"], state["unread"], state["mentions"]) == (4, 0, 4, 2)
    read = await reader.call("read", {"room": "pings", "id": 2})
    assert (read["unread"], read["mentions"]) == (2, 1)
    # Naming oneself is no mention to count, and sending marks the room read.
    await send(reader, "pings", "@user20 talking to myself")
    state = await reader.call("join", {"room": "pings"})
    assert (state["unread"], state["mentions"]) == (0, 0)


async def test_an_edit_recomputes_mentions_and_a_deleted_message_is_no_longer_unread(visitors):
    reader_visitor = await visitors()
    await reader_visitor.register("Dora")
    reader, _ = await tab(reader_visitor)
    writer_visitor = await visitors()
    await writer_visitor.register("eve")
    writer, _ = await tab(writer_visitor)
    first = await send(writer, "general", "hello @dora")
    second = await send(writer, "general", "plain")
    state = await reader.call("join", {"room": "general"})
    assert (state["unread"], state["mentions"]) == (2, 1)
    # An edit that adds the mention: the room gets the Message with it, and it counts.
    ack = await writer.call("edit chat", {"room": "general", "id": second, "msg": "now @DORA too"})
    assert ack["ok"] is True, ack
    edited = await reader.next("chat edited")
    assert edited["id"] == second and edited["mentions"] == ["Dora"] and edited["edited"] is not None
    state = await reader.call("join", {"room": "general"})
    assert (state["unread"], state["mentions"]) == (2, 2)
    # One that removes it: no longer counted.
    assert (await writer.call("edit chat", {"room": "general", "id": first, "msg": "hello all"}))["ok"] is True
    assert (await reader.next("chat edited"))["mentions"] == []
    state = await reader.call("join", {"room": "general"})
    assert (state["unread"], state["mentions"]) == (2, 1)
    # A deleted message is no longer unread, nor a mention.
    assert (await writer.call("delete chat", {"room": "general", "id": second}))["ok"] is True
    state = await reader.call("join", {"room": "general"})
    assert (state["last_id"], state["read_id"], state["unread"], state["mentions"]) == (2, 0, 1, 0)


async def test_a_resent_client_id_moves_no_marker_and_tells_no_other_tab(visitors):
    guest = await visitors()
    tab1, _ = await tab(guest)
    tab2, _ = await tab(guest)
    ack = await tab1.call("send chat", {"room": "general", "msg": "once", "client_id": "c-1"})
    assert await tab2.next("room state", timeout=WITHIN) == room_state("general", ack["id"], ack["id"])
    again = await tab1.call("send chat", {"room": "general", "msg": "once", "client_id": "c-1"})
    assert again == {"ok": True, "id": ack["id"], "rev": ack["rev"]}
    await tab2.nothing("room state")


# -- typing -----------------------------------------------------------------------------------


async def test_typing_reaches_the_other_sessions_in_the_room_at_most_once_every_2_s(visitors):
    alice = await visitors()
    alice1, _ = await tab(alice)
    alice2, _ = await tab(alice)
    bob, _ = await tab(await visitors())
    outsider, _ = await tab(await visitors())
    for socket in (alice1, bob):
        assert (await socket.call("join", {"room": "t"}))["ok"] is True

    assert await alice1.call("typing", {"room": "t"}) == {"ok": True}
    assert await bob.next("typing") == {"room": "t", "member": alice1.me}
    assert await alice1.call("typing", {"room": "t"}) == {"ok": True}  # within 2 s: not relayed
    assert await alice2.call("typing", {"room": "t"}) == {"ok": True}  # the same session
    await bob.nothing("typing", wait=0.2)
    for socket in (alice1, alice2, outsider):
        await socket.nothing("typing", wait=0)
    assert await bob.call("typing", {"room": "t"}) == {"ok": True}
    for socket in (alice1, alice2):
        assert await socket.next("typing") == {"room": "t", "member": bob.me}
    assert (await outsider.call("typing", {"room": "t"}))["error"] == "not_in_room"
    assert (await outsider.call("typing", {"room": "T"}))["error"] == "invalid_room"
    assert (await outsider.call("typing", "t"))["error"] == "invalid_request"


async def test_typing_is_not_relayed_in_a_room_with_more_than_100_online(visitors, base_url):
    watcher, _ = await tab(await visitors())
    typist, _ = await tab(await visitors())
    second, _ = await tab(await visitors())
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        crowd = await connect_many(http, base_url, 98)  # with the three: 101 in general
        try:
            await asyncio.sleep(0.3)  # presence has counted them
            assert await typist.call("typing", {"room": "general"}) == {"ok": True}
            await watcher.nothing("typing", wait=0.3)
            await crowd.pop().close()
            await asyncio.sleep(0.3)  # 100 online now: relayed
            assert await second.call("typing", {"room": "general"}) == {"ok": True}
            assert (await watcher.next("typing"))["member"] == second.me
        finally:
            for member in crowd:
                await member.close()
