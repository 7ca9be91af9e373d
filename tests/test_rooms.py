"""Rooms, presence, history paging and recovery, the chat rate limit, message size and
HTML as text (issue 4, acceptance 1–4 and 6), over real sockets to a real chatd."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import SocketClient, Visitor, by_name

pytestmark = pytest.mark.storage

SQLITE_INT_MAX = 2**63 - 1
PRESENCE_WINDOW = 0.15  # longer than a small room gathers presence changes


# -- helpers ---------------------------------------------------------------------


async def person(visitors, *rooms: str) -> tuple[Visitor, SocketClient, str]:
    """A new visitor with one socket, in general and in `rooms`; (visitor, socket, name)."""
    visitor = await visitors()
    socket = await visitor.socket()
    name = (await socket.next("welcome"))["name"]
    for room in rooms:
        ack = await socket.call("join", {"room": room})
        assert ack["ok"] is True, ack
    return visitor, socket, name


async def settle(*sockets: SocketClient) -> None:
    """Let every pending broadcast land, then forget the presence events.

    A round trip per socket orders it after everything the server has already
    queued for that socket (an invalid request has no side effects)."""
    for socket in sockets:
        assert (await socket.call("join", "barrier"))["error"] == "invalid_request"
    await asyncio.sleep(PRESENCE_WINDOW)
    for socket in sockets:
        socket.drain("presence")


async def quiet(*sockets: SocketClient, event: str = "presence") -> None:
    """Assert that nothing of `event` is pending for these sockets, once what the server queued has landed."""
    for socket in sockets:
        assert (await socket.call("join", "barrier"))["error"] == "invalid_request"
    await asyncio.sleep(PRESENCE_WINDOW)
    for socket in sockets:
        assert socket.drain(event) == [], event


async def chat_until(socket: SocketClient, message_id: int) -> list[dict]:
    """Every `new chat` up to and including the one with `message_id`."""
    seen = []
    while True:
        message = await socket.next("new chat")
        seen.append(message)
        if message["id"] == message_id:
            return seen


async def send_all(plan: list[tuple[SocketClient, str, str]]) -> list[tuple[int, str, str]]:
    """Send (socket, room, text) messages: each socket in order, the sockets at once.

    (id, room, text) of each, by id."""

    async def one_socket(socket: SocketClient, items: list[tuple[str, str]]) -> list[tuple[int, str, str]]:
        sent = []
        for room, text in items:
            ack = await socket.call("send chat", {"msg": text, "room": room})
            assert ack["ok"] is True, (ack, room, text)
            sent.append((ack["id"], room, text))
        return sent

    by_socket: dict[SocketClient, list[tuple[str, str]]] = {}
    for socket, room, text in plan:
        by_socket.setdefault(socket, []).append((room, text))
    results = await asyncio.gather(*(one_socket(s, items) for s, items in by_socket.items()))
    return sorted(entry for result in results for entry in result)


def member(name: str, account: str | None = None, id: str | None = None) -> dict:  # noqa: A002 (SPEC's name)
    return {"id": id, "name": name, "account": account}


def change(room: str, joins=(), leaves=(), *, count: int) -> dict:
    """A `presence` event; `count` is how many are online in the room after it."""
    return {"room": room, "joins": list(joins), "leaves": list(leaves), "count": count}


def ids(messages: list[dict]) -> list[int]:
    return [m["id"] for m in messages]


# -- 1. rooms -----------------------------------------------------------------------


async def test_messages_to_a_room_reach_exactly_its_members_and_leave_stops_delivery(visitors):
    _, alice, alice_name = await person(visitors, "x")
    _, bob, _ = await person(visitors, "x")
    _, carol, _ = await person(visitors)  # general only
    await settle(alice, bob, carol)

    to_x = await alice.call("send chat", {"msg": "for x", "room": "x"})
    assert to_x["ok"] is True
    for socket in (alice, bob):
        message = await socket.next("new chat")
        assert (message["id"], message["room"], message["msg"], message["name"]) == (to_x["id"], "x", "for x", alice_name)
    to_general = await alice.call("send chat", {"msg": "for everyone"})
    # Carol's first message is the general one: the one to x, sent before it, never reached her.
    for socket in (carol, bob, alice):
        message = await socket.next("new chat")
        assert (message["id"], message["room"], message["msg"]) == (to_general["id"], "general", "for everyone")
    assert (to_x["id"], to_general["id"]) == (1, 1)  # ids count per room

    assert await bob.call("leave", {"room": "x"}) == {"ok": True}
    after_leave = await alice.call("send chat", {"msg": "x without bob", "room": "x"})
    assert (await alice.next("new chat"))["id"] == after_leave["id"]
    marker = await alice.call("send chat", {"msg": "marker"})
    assert [m["id"] for m in await chat_until(bob, marker["id"])] == [marker["id"]]
    assert [m["id"] for m in await chat_until(carol, marker["id"])] == [marker["id"]]

    # Bob is out of x now: sending, reading and leaving it are not_in_room, by ack and by chat_error.
    for event, payload in (
        ("send chat", {"msg": "let me in", "room": "x"}),
        ("history", {"room": "x"}),
        ("leave", {"room": "x"}),
    ):
        ack = await bob.call(event, payload)
        assert ack["ok"] is False and ack["error"] == "not_in_room" and ack["message"], (event, ack)
        await bob.emit(event, payload)
        error = await bob.next("chat_error")
        assert (error["event"], error["error"]) == (event, "not_in_room") and error["message"]
    history = await alice.call("history", {"room": "x"})
    assert [m["msg"] for m in history["messages"]] == ["for x", "x without bob"]


async def test_sending_to_a_room_never_joined_is_not_in_room_and_reaches_nobody(visitors):
    _, alice, _ = await person(visitors)
    _, bob, _ = await person(visitors, "secret")
    await settle(alice, bob)
    ack = await alice.call("send chat", {"msg": "sneaking in", "room": "secret"})
    assert ack["ok"] is False and ack["error"] == "not_in_room"
    assert (await alice.call("history", {"room": "secret"}))["error"] == "not_in_room"
    await bob.nothing("new chat")
    assert (await bob.call("history", {"room": "secret"}))["messages"] == []


async def test_join_acks_history_and_online_and_joining_again_changes_nothing(visitors):
    _, alice, _ = await person(visitors)
    _, bob, _ = await person(visitors)
    await settle(alice, bob)

    first = await alice.call("join", {"room": "x"})
    state = {"last_id": 0, "read_id": 0, "unread": 0, "mentions": 0}
    assert first == {"ok": True, "room": "x", "topic": "", "history": [], "online": [alice.me], "online_count": 1,
                     **state}  # fmt: skip
    assert await alice.next("presence") == change("x", joins=[alice.me], count=1)
    sent = await alice.call("send chat", {"msg": "hello x", "room": "x"})
    assert (await alice.next("new chat"))["id"] == sent["id"]

    both = by_name([alice.me, bob.me])
    second = await bob.call("join", {"room": "x"})
    assert second["online"] == both and ids(second["history"]) == [sent["id"]] and second["online_count"] == 2
    # bob joins with the room read up to its last message.
    assert {k: second[k] for k in state} == {"last_id": sent["id"], "read_id": sent["id"], "unread": 0, "mentions": 0}
    for socket in (alice, bob):
        assert await socket.next("presence") == change("x", joins=[bob.me], count=2)

    again = await alice.call("join", {"room": "x"})
    alice_state = {"last_id": sent["id"], "read_id": sent["id"], "unread": 0, "mentions": 0}  # she sent it
    assert again == {"ok": True, "room": "x", "topic": "", "history": second["history"], "online": both,
                     "online_count": 2, **alice_state}  # fmt: skip
    await quiet(alice, bob)
    # Still one membership: a message to x arrives once.
    sent = await bob.call("send chat", {"msg": "once", "room": "x"})
    assert (await alice.next("new chat"))["id"] == sent["id"]
    await alice.nothing("new chat", wait=0.2)


async def test_fifty_rooms_per_session_general_included(visitors):
    visitor, alice, _ = await person(visitors)
    for i in range(1, 50):  # general + 49 = 50
        assert (await alice.call("join", {"room": f"r{i}"}))["ok"] is True
    ack = await alice.call("join", {"room": "r50"})
    assert ack["ok"] is False and ack["error"] == "too_many_rooms" and ack["message"]
    await alice.emit("join", {"room": "r50"})
    error = await alice.next("chat_error")
    assert (error["event"], error["error"]) == ("join", "too_many_rooms")
    # The refused room was not joined.
    assert (await alice.call("send chat", {"msg": "hi", "room": "r50"}))["error"] == "not_in_room"
    # At the cap, rooms already joined can still be joined again.
    assert (await alice.call("join", {"room": "r7"}))["ok"] is True
    assert (await alice.call("join", {"room": "general"}))["ok"] is True

    # The cap is per session: another tab of the same session is in the same 50 rooms.
    other_tab = await visitor.socket()
    assert len((await other_tab.next("welcome"))["rooms"]) == 50
    assert (await other_tab.call("join", {"room": "r50"}))["error"] == "too_many_rooms"
    # Another session has its own.
    _, stranger, _ = await person(visitors, "r50")

    # Leaving general (allowed) frees a place, for both tabs.
    assert await alice.call("leave", {"room": "general"}) == {"ok": True}
    assert await other_tab.next("left") == {"room": "general", "reason": "left"}
    assert (await alice.call("join", {"room": "r50"}))["ok"] is True
    assert await other_tab.next("joined") == {"room": "r50"}
    assert (await other_tab.call("join", {"room": "r51"}))["error"] == "too_many_rooms"
    assert (await other_tab.call("send chat", {"msg": "gone from general"}))["error"] == "not_in_room"
    sent = await alice.call("send chat", {"msg": "in r50", "room": "r50"})
    assert sent["ok"] is True
    for socket in (other_tab, stranger):
        assert (await socket.next("new chat"))["id"] == sent["id"]


async def test_leaving_general_is_allowed_and_announced(visitors):
    _, alice, alice_name = await person(visitors)
    _, bob, bob_name = await person(visitors)
    await settle(alice, bob)
    assert await alice.call("leave", {"room": "general"}) == {"ok": True}
    assert await bob.next("presence") == change("general", leaves=[alice.me], count=1)
    ack = await alice.call("send chat", {"msg": "hello?"})
    assert ack["error"] == "not_in_room"
    sent = await bob.call("send chat", {"msg": "alice cannot hear this"})
    assert (await bob.next("new chat"))["id"] == sent["id"]
    await alice.nothing("new chat", wait=0.2)
    back = await alice.call("join", {"room": "general"})
    assert ids(back["history"]) == [sent["id"]]
    assert back["online"] == by_name([alice.me, bob.me])


BAD_ROOMS = [
    ("capitals", "General", "invalid_room"),
    ("leading dash", "-x", "invalid_room"),
    ("33 characters", "a" * 33, "invalid_room"),
    ("trailing newline", "abc\n", "invalid_room"),
    ("empty", "", "invalid_room"),
    ("space", "a b", "invalid_room"),
    ("underscore", "a_b", "invalid_room"),
    ("non-ASCII letter", "café", "invalid_room"),
    ("non-ASCII digit", "x\u0663", "invalid_room"),
    ("a number", 12, "invalid_request"),
    ("a list", ["x"], "invalid_request"),
    ("an object", {"room": "x"}, "invalid_request"),
    ("a boolean", True, "invalid_request"),
]


async def test_bad_room_names_are_refused_by_every_event(visitors):
    # One server for all cases (each start hashes a dummy password: slow).
    _, alice, _ = await person(visitors)
    for case, room, code in BAD_ROOMS:
        payloads = {
            "join": {"room": room},
            "leave": {"room": room},
            "history": {"room": room},
            "send chat": {"msg": "hi", "room": room},
        }
        for event, payload in payloads.items():
            ack = await alice.call(event, payload)
            assert ack["ok"] is False and ack["error"] == code and ack["message"], (case, event, ack)
            await alice.emit(event, payload)
            error = await alice.next("chat_error")
            assert (error["event"], error["error"]) == (event, code), (case, error)
    await quiet(alice, event="new chat")
    await quiet(alice, event="chat_error")
    assert (await alice.call("join", {"room": "x"}))["ok"] is True  # the socket is fine


async def test_a_required_room_that_is_missing_or_null_is_invalid_request(visitors):
    _, alice, _ = await person(visitors)
    for event in ("join", "leave", "history"):
        for payload in ({}, {"room": None}, {"name": "general"}):
            assert (await alice.call(event, payload))["error"] == "invalid_request", (event, payload)
    # For send chat the room is optional: null means general.
    assert (await alice.call("send chat", {"msg": "to general", "room": None}))["ok"] is True
    assert (await alice.next("new chat"))["room"] == "general"


async def test_edge_room_names_that_are_valid(visitors):
    _, alice, _ = await person(visitors)
    for room in ["a" * 32, "0", "a-", "9-9-", "x--y"]:
        assert (await alice.call("join", {"room": room}))["room"] == room
        sent = await alice.call("send chat", {"msg": "ok", "room": room})
        message = await alice.next("new chat")
        assert (message["id"], message["room"]) == (sent["id"], room)
        assert await alice.call("leave", {"room": room}) == {"ok": True}


# -- 2. presence -----------------------------------------------------------------------


async def test_presence_one_entry_per_session_sorted_and_updated_on_join_leave_disconnect_and_logout(visitors):
    # Case-insensitive order (alice, bob, Carol) differs from code point order (Carol, alice, bob).
    people = {}
    for name in ("bob", "Carol", "alice"):
        people[name] = await visitors()
        assert await people[name].register(name) == {"name": name, "account": name}

    alice_tab1 = await people["alice"].socket()
    assert (await alice_tab1.next("welcome"))["online"] == [alice := alice_tab1.me]
    assert alice == member("alice", "alice", alice_tab1.id)
    assert await alice_tab1.next("presence") == change("general", joins=[alice], count=1)
    alice_tab2 = await people["alice"].socket(transport="polling")
    assert (await alice_tab2.next("welcome"))["online"] == [alice]  # two tabs, one member
    assert alice_tab2.id == alice_tab1.id
    bob_socket = await people["bob"].socket()
    assert (await bob_socket.next("welcome"))["online"] == [alice, bob := bob_socket.me]
    for socket in (alice_tab1, alice_tab2, bob_socket):
        assert await socket.next("presence") == change("general", joins=[bob], count=2)
    carol_socket = await people["Carol"].socket()
    assert (await carol_socket.next("welcome"))["online"] == [alice, bob, carol := carol_socket.me]
    for socket in (alice_tab1, alice_tab2, bob_socket, carol_socket):
        assert await socket.next("presence") == change("general", joins=[carol], count=3)
    assert len({alice["id"], bob["id"], carol["id"]}) == 3
    # alice's second tab changed nothing, so nobody heard of it.
    await quiet(alice_tab1, alice_tab2, bob_socket, carol_socket)

    # A room of its own: join. A tab's join takes every tab of the account into the room.
    assert (await bob_socket.call("join", {"room": "lobby"}))["online"] == [bob]
    assert await bob_socket.next("presence") == change("lobby", joins=[bob], count=1)
    assert (await alice_tab2.call("join", {"room": "lobby"}))["online"] == [alice, bob]
    assert await alice_tab1.next("joined") == {"room": "lobby"}
    for socket in (bob_socket, alice_tab1, alice_tab2):
        assert await socket.next("presence") == change("lobby", joins=[alice], count=2)
    # alice's first tab asks for the room's snapshot: alice is there already, nothing changes.
    assert (await alice_tab1.call("join", {"room": "lobby"}))["online"] == [alice, bob]
    await quiet(alice_tab1, alice_tab2, bob_socket)
    assert (await carol_socket.call("join", {"room": "lobby"}))["online"] == [alice, bob, carol]
    for socket in (bob_socket, alice_tab1, alice_tab2, carol_socket):
        assert await socket.next("presence") == change("lobby", joins=[carol], count=3), socket

    # Leave: one of alice's tabs leaving takes the room from both; then bob leaves.
    assert await alice_tab2.call("leave", {"room": "lobby"}) == {"ok": True}
    assert await alice_tab1.next("left") == {"room": "lobby", "reason": "left"}
    for socket in (bob_socket, carol_socket):
        assert await socket.next("presence") == change("lobby", leaves=[alice], count=2)
    assert await bob_socket.call("leave", {"room": "lobby"}) == {"ok": True}
    assert await carol_socket.next("presence") == change("lobby", leaves=[bob], count=1)
    await quiet(bob_socket, alice_tab1, alice_tab2)  # out of lobby, and general did not change

    # Disconnect: one of alice's tabs goes; general keeps her (the other tab) and says nothing.
    await alice_tab1.close()
    await quiet(bob_socket, carol_socket)
    await alice_tab2.close()
    for socket in (bob_socket, carol_socket):
        assert await socket.next("presence") == change("general", leaves=[alice], count=2)
    await quiet(bob_socket, carol_socket)

    # The session ends (logout): its socket is told and goes, and the rooms hear of it.
    status, _ = await people["Carol"].post("/api/logout")
    assert status == 200
    assert await carol_socket.next("session_ended") == {"reason": "logout"}
    assert await bob_socket.next("presence") == change("general", leaves=[carol], count=1)
    assert bob_socket.members() == [bob]


async def test_online_list_sorts_guests_and_accounts_together_without_regard_to_case(visitors):
    names = ["zed", "Gamma", "alpha", "Beta"]
    for name in names:
        visitor = await visitors()
        await visitor.register(name)
        await (await visitor.socket()).next("welcome")
    _, socket, guest = await person(visitors)
    while len(socket.members()) < len(names) + 1:  # the last ones may still be on their way
        await socket.next("presence")
    welcome_online = [m["name"] for m in (await socket.call("join", {"room": "general"}))["online"]]
    assert welcome_online == sorted(names + [guest], key=str.casefold)
    assert welcome_online != sorted(names + [guest])  # the case-insensitive order really is different


# -- 3. history paging and recovery -------------------------------------------------------


async def test_history_pages_back_over_300_messages_without_gaps_or_duplicates(visitors):
    # 17 sessions × 20 messages (the burst each session may send): 272 to general, 68 to "side".
    senders = [(await person(visitors, "side"))[1] for _ in range(17)]
    plan = [
        (socket, "side" if i % 5 == 4 else "general", f"message {n}-{i}")
        for n, socket in enumerate(senders)
        for i in range(20)
    ]
    sent = await send_all(plan)
    general = [entry for entry in sent if entry[1] == "general"]
    side = [entry for entry in sent if entry[1] == "side"]
    assert (len(general), len(side)) == (272, 68)

    _, reader, _ = await person(visitors)
    # The welcome of a new socket, and join, carry exactly the last 50, oldest first.
    visitor = await visitors()
    fresh = await visitor.socket()
    welcome_history = (await fresh.next("welcome"))["history"]
    assert [(m["id"], m["room"], m["msg"]) for m in welcome_history] == general[-50:]
    joined = await reader.call("join", {"room": "side"})
    assert [(m["id"], m["room"], m["msg"]) for m in joined["history"]] == side[-50:]
    latest = await reader.call("history", {"room": "general"})  # default limit: 50
    assert latest["messages"] == welcome_history

    # Scroll back in pages of 100 with `before`.
    pages = []
    page = (await reader.call("history", {"room": "general", "limit": 100}))["messages"]
    while page:
        assert len(pages) < 3, "paging back never ends"
        pages.append(page)
        assert ids(page) == sorted(ids(page)) and len(set(ids(page))) == len(page)  # oldest first
        assert all(m["room"] == "general" for m in page)
        reply = await reader.call("history", {"room": "general", "before": page[0]["id"], "limit": 100})
        page = reply["messages"]
    assert [len(p) for p in pages] == [100, 100, 72]
    everything = [m for p in reversed(pages) for m in p]
    assert [(m["id"], m["room"], m["msg"]) for m in everything] == general  # no gaps, no duplicates

    # Forward from the oldest with `after`, in pages of 100, gives the same list.
    forward = everything[:1]
    while chunk := (await reader.call("history", {"room": "general", "after": forward[-1]["id"], "limit": 100}))[
        "messages"
    ]:
        assert len(chunk) == min(100, len(everything) - len(forward)), "paging forward overshoots"
        forward.extend(chunk)
    assert forward == everything

    # The other room's pages are its own.
    side_all = (await reader.call("history", {"room": "side", "limit": 100}))["messages"]
    assert [(m["id"], m["room"], m["msg"]) for m in side_all] == side
    small = (await reader.call("history", {"room": "side", "before": side[10][0], "limit": 3}))["messages"]
    assert ids(small) == [entry[0] for entry in side[7:10]]


async def test_a_reconnecting_client_recovers_exactly_what_it_missed_with_after(visitors):
    reader_visitor, reader, reader_name = await person(visitors, "side")
    _, first, _ = await person(visitors, "side")
    _, second, _ = await person(visitors, "side")
    await settle(reader, first, second)
    seen = await first.call("send chat", {"msg": "before the drop"})
    last_seen = (await reader.next("new chat"))["id"]
    assert last_seen == seen["id"]

    reader_id = reader.id
    await reader.close()
    while reader_id in first.online["general"]:
        await first.next("presence")

    plan = [(first, "general", f"missed {i}") for i in range(19)]  # first has sent one already
    plan += [(second, "general", f"missed {i}") for i in range(19, 30)]
    plan += [(second, "side", f"elsewhere {i}") for i in range(5)]
    sent = await send_all(plan)
    missed = [entry for entry in sent if entry[1] == "general"]
    assert len(missed) == 30

    again = await reader_visitor.socket()
    welcome = await again.next("welcome")
    assert welcome["name"] == reader_name
    recovered = await again.call("history", {"room": "general", "after": last_seen})
    assert [(m["id"], m["room"], m["msg"]) for m in recovered["messages"]] == missed
    # Catching up in smaller pages works the same way.
    head = (await again.call("history", {"room": "general", "after": last_seen, "limit": 10}))["messages"]
    tail = (await again.call("history", {"room": "general", "after": head[-1]["id"], "limit": 100}))["messages"]
    assert ids(head + tail) == [entry[0] for entry in missed]
    # Nothing after the newest.
    assert (await again.call("history", {"room": "general", "after": missed[-1][0]}))["messages"] == []


BAD_HISTORY = [
    ("limit 0", {"limit": 0}),
    ("limit 101", {"limit": 101}),
    ("limit negative", {"limit": -5}),
    ("limit a string", {"limit": "10"}),
    ("limit a float", {"limit": 10.0}),
    ("limit true", {"limit": True}),
    ("limit false", {"limit": False}),
    ("before and after", {"before": 10, "after": 2}),
    ("before 0", {"before": 0}),
    ("before negative", {"before": -1}),
    ("after 0", {"after": 0}),
    ("after hugely negative", {"after": -(2**70)}),
    ("before true", {"before": True}),
    ("after false", {"after": False}),
    ("before a string", {"before": "5"}),
    ("after a float", {"after": 1.5}),
    ("after a list", {"after": [1]}),
    ("room missing", {"room": None}),
]


async def test_bad_history_queries_are_invalid_request(visitors):
    _, alice, _ = await person(visitors)
    await send_all([(alice, "general", f"m{i}") for i in range(3)])
    for case, fields in BAD_HISTORY:
        payload = {"room": "general", **fields}
        ack = await alice.call("history", payload)
        assert ack["ok"] is False and ack["error"] == "invalid_request" and ack["message"], (case, ack)
        await alice.emit("history", payload)
        error = await alice.next("chat_error")
        assert (error["event"], error["error"]) == ("history", "invalid_request"), (case, error)
    await quiet(alice, event="chat_error")


async def test_history_limits_at_the_edges_and_null_fields_count_as_absent(visitors):
    _, alice, _ = await person(visitors)
    sent = await send_all([(alice, "general", f"m{i}") for i in range(3)])
    assert ids((await alice.call("history", {"room": "general", "limit": 1}))["messages"]) == [sent[-1][0]]
    assert len((await alice.call("history", {"room": "general", "limit": 100}))["messages"]) == 3
    nulls = await alice.call("history", {"room": "general", "before": None, "after": None, "limit": None})
    assert ids(nulls["messages"]) == [entry[0] for entry in sent]
    with_extra = await alice.call("history", {"room": "general", "after": sent[0][0], "colour": "blue"})
    assert ids(with_extra["messages"]) == [entry[0] for entry in sent[1:]]


async def test_huge_ids_are_valid_and_harmless(visitors):
    """Beyond what storage holds, an id still means what it says: everything is before it, nothing after."""
    _, alice, _ = await person(visitors)
    sent = [entry[0] for entry in await send_all([(alice, "general", f"m{i}") for i in range(3)])]
    for huge in (SQLITE_INT_MAX, SQLITE_INT_MAX + 1, 2**64 - 1, 2**64, 2**70, 10**300):
        before = await alice.call("history", {"room": "general", "before": huge})
        assert before["ok"] is True and ids(before["messages"]) == sent, (huge, before)
        answer = await alice.call("history", {"room": "general", "after": huge})
        assert answer == {"ok": True, "messages": [], "rev": answer["rev"]}, huge
        # The same when something orjson cannot read (a lone surrogate) is elsewhere in the payload.
        odd = await alice.call("history", {"room": "general", "before": huge, "note": "\ud800"})
        assert odd["ok"] is True and ids(odd["messages"]) == sent, (huge, odd)
        huge_limit = await alice.call("history", {"room": "general", "limit": huge})
        assert huge_limit["error"] == "invalid_request", (huge, huge_limit)


# -- 4. the rate limit -------------------------------------------------------------------------


async def test_rate_limit_burst_of_20_per_session_shared_by_its_sockets(visitors):
    visitor, tab1, _ = await person(visitors)
    tab2 = await visitor.socket()
    await tab2.next("welcome")
    _, bystander, _ = await person(visitors)
    await settle(tab1, tab2, bystander)

    # All 22 at once, without waiting for acks, from both tabs: one session, one
    # bucket. A token is taken as the server reads an event, so the two it reads
    # last are refused however long the 20 durable acks take; a token refills in
    # 0.2 s, so the refusals must come back within that (they wait for nothing).
    started = time.monotonic()

    async def send(tab, text: str) -> tuple[dict, str, float]:
        ack = await tab.call("send chat", {"msg": text})
        return ack, text, time.monotonic() - started

    results = await asyncio.gather(*(send(tab1 if i % 2 else tab2, f"burst {i}") for i in range(22)))
    refusals = [(ack, after) for ack, _, after in results if not ack["ok"]]
    assert len(refusals) == 2, results
    assert all(after < 0.2 for _, after in refusals), ("the burst was too slow to test the limit", refusals)
    acks = [(ack, text) for ack, text, _ in results if ack["ok"]]
    burst = [text for _, text in sorted((ack["id"], text) for ack, text in acks)]  # in the server's order
    assert len(set(burst)) == 20
    accepted = sorted(ack["id"] for ack, _ in acks)
    for ack, _ in refusals:
        assert set(ack) == {"ok", "error", "message", "retry_after"}, ack
        assert ack["ok"] is False and ack["error"] == "rate_limited" and ack["message"]
        assert isinstance(ack["retry_after"], (int, float)) and 0 < ack["retry_after"] <= 0.2 + 1e-9
    # Without an ack: chat_error, with the same fields.
    await tab1.emit("send chat", {"msg": "over the limit 3"})
    error = await tab1.next("chat_error")
    assert (error["event"], error["error"]) == ("send chat", "rate_limited") and error["retry_after"] > 0

    # Another session is not limited by this one.
    other = await bystander.call("send chat", {"msg": "someone else"})
    assert other["ok"] is True

    await asyncio.sleep(error["retry_after"])
    again = await tab2.call("send chat", {"msg": "after waiting"})
    assert again["ok"] is True, again

    # The refused messages were never sent nor stored.
    for socket in (tab1, tab2, bystander):
        texts = [m["msg"] for m in await chat_until(socket, again["id"])]
        assert texts == burst + ["someone else", "after waiting"], texts
    history = (await bystander.call("history", {"room": "general", "limit": 100}))["messages"]
    assert [m["msg"] for m in history] == burst + ["someone else", "after waiting"]
    assert ids(history)[:20] == accepted


async def test_rate_limit_refills_at_five_per_second(visitors):
    _, alice, _ = await person(visitors)

    async def send(text: str) -> tuple[dict, float]:
        ack = await alice.call("send chat", {"msg": text})
        return ack, time.monotonic()

    # 21 at once from one socket (see the burst test above): the last is refused,
    # when it is read, whatever the 20 durable acks take.
    *sent, (refused, refused_at) = await asyncio.gather(*(send(f"m{i}") for i in range(21)))
    assert all(ack["ok"] is True for ack, _ in sent), sent
    assert refused.get("error") == "rate_limited", refused
    wait = refused_at + refused["retry_after"] + 0.2 * 3 + 0.05 - time.monotonic()  # 4¼ tokens back, not 20
    assert wait > 0, "the acks were too slow to test the refill"
    await asyncio.sleep(wait)
    results = [ack["ok"] for ack in await asyncio.gather(*(alice.call("send chat", {"msg": f"later {i}"}) for i in range(6)))]
    assert results.count(True) == 4, results


# -- 6. size and HTML ------------------------------------------------------------------------------


async def test_message_length_is_counted_after_trimming(visitors):
    _, alice, _ = await person(visitors)
    _, bob, _ = await person(visitors)
    await settle(alice, bob)
    longest = "x" * 2000
    ack = await alice.call("send chat", {"msg": " \n\t" + longest + "  \r\n"})
    assert ack["ok"] is True
    assert (await bob.next("new chat"))["msg"] == longest
    too_long = await alice.call("send chat", {"msg": " " + "y" * 2001 + " "})
    assert too_long["ok"] is False and too_long["error"] == "invalid_message"
    history = (await bob.call("history", {"room": "general"}))["messages"]
    assert [m["msg"] for m in history] == [longest]


HOSTILE_TEXT = [
    "<img src=x onerror=alert(1)>",
    '<script>alert("pwned")</script>',
    "&lt;b&gt;not bold&lt;/b&gt; &amp; <b>bold?</b>",
    "</div><iframe src=\"javascript:alert('x')\"></iframe>",
    "{{constructor.constructor('alert(1)')()}} ${7*7} \\u003c",
    "null\x00byte and \u202eright-to-left\u202c and emoji 😀",
]


async def test_html_comes_back_byte_for_byte(visitors):
    _, alice, _ = await person(visitors)
    _, bob, _ = await person(visitors)
    await settle(alice, bob)
    for text in HOSTILE_TEXT:
        ack = await alice.call("send chat", {"msg": text})
        assert ack["ok"] is True, (text, ack)
        message = await bob.next("new chat")
        assert message["msg"] == text and message["msg"].encode("utf-8") == text.encode("utf-8")
    history = (await alice.call("history", {"room": "general"}))["messages"]
    assert [m["msg"] for m in history] == HOSTILE_TEXT
    # And on a fresh socket's welcome.
    _, carol, _ = await person(visitors)
    assert [m["msg"] for m in (await carol.call("join", {"room": "general"}))["history"]] == HOSTILE_TEXT
