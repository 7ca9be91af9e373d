"""Direct messages, the room directory and topics, and moderation (issue 22) — over real
sockets to a real chatd (SQLite, or PostgreSQL with CHATD_TEST_BACKEND=postgres).
Across processes: tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatd.storage.audit import read_postgres, read_sqlite
from conftest import TEST_BACKEND, SocketClient, Visitor

pytestmark = pytest.mark.storage

ROOT = Path(__file__).resolve().parent.parent
WITHIN = 1.0  # SPEC: every action takes effect on every process within 1 s


@pytest.fixture
async def chat(start_chatd, visitors, data_dir, request):
    """A chatd with operator `root`; `await chat.account("alice")` → (visitor, socket, welcome)."""
    url = await start_chatd(operators=("root",))

    class Chat:
        async def storage_audit(self) -> list[dict]:
            """The audit log, newest first, as `python -m chatd audit` reads it."""
            if TEST_BACKEND == "postgres":
                return await read_postgres(request.getfixturevalue("pg_database_url"), None, 50)
            return await asyncio.to_thread(read_sqlite, data_dir, None, 50)

        async def account(self, name: str) -> tuple[Visitor, SocketClient, dict]:
            visitor = await visitors(url)
            await visitor.register(name)
            socket = await visitor.socket()
            return visitor, socket, await socket.next("welcome")

        async def guest(self) -> tuple[Visitor, SocketClient, dict]:
            visitor = await visitors(url)
            socket = await visitor.socket()
            return visitor, socket, await socket.next("welcome")

    return Chat()


async def ok(socket: SocketClient, event: str, payload: dict) -> dict:
    ack = await socket.call(event, payload)
    assert ack["ok"] is True, (event, payload, ack)
    return ack


async def receive(socket: SocketClient, event: str, predicate, timeout: float = WITHIN):
    deadline = time.monotonic() + timeout
    while True:
        item = await socket.next(event, timeout=max(0.01, deadline - time.monotonic()))
        if predicate(item):
            return item


async def refused(socket: SocketClient, event: str, payload, code: str) -> dict:
    ack = await socket.call(event, payload)
    assert ack["ok"] is False and ack["error"] == code, (event, payload, ack)
    return ack


# -- roles ---------------------------------------------------------------------------------


async def test_who_may_act_on_whom(chat):
    _, alice, _ = await chat.account("alice")  # the owner: first account in `den`
    _, bob, _ = await chat.account("bob")
    _, carol, _ = await chat.account("carol")
    _, dave, _ = await chat.account("dave")
    _, root, _ = await chat.account("Root")  # an operator, whatever the case
    for socket in (alice, bob, carol, dave):
        await ok(socket, "join", {"room": "den"})

    # Without the right: forbidden.
    await refused(bob, "kick", {"room": "den", "username": "carol"}, "forbidden")
    await refused(bob, "moderator", {"room": "den", "username": "carol", "on": True}, "forbidden")
    # The owner names moderators; a moderator does not.
    await ok(alice, "moderator", {"room": "den", "username": "BOB", "on": True})
    await ok(alice, "moderator", {"room": "den", "username": "dave", "on": True})
    await refused(bob, "moderator", {"room": "den", "username": "carol", "on": True}, "forbidden")
    await ok(bob, "mute", {"room": "den", "username": "carol", "seconds": 60})
    # Moderators act neither on the owner nor on each other; nobody acts on an operator.
    await refused(bob, "kick", {"room": "den", "username": "alice"}, "forbidden")
    await refused(bob, "mute", {"room": "den", "username": "dave", "seconds": 5}, "forbidden")
    await refused(alice, "ban", {"room": "den", "username": "root", "on": True}, "forbidden")
    await refused(root, "kick", {"room": "den", "username": "root"}, "forbidden")
    # The owner acts on its moderators; an operator on the owner, in any room, joined or not.
    await ok(alice, "moderator", {"room": "den", "username": "dave", "on": False})
    await ok(bob, "mute", {"room": "den", "username": "dave", "seconds": 5})
    await ok(root, "mute", {"room": "den", "username": "alice", "seconds": 5})
    # `general` has no owner: only operators moderate it.
    await refused(alice, "kick", {"room": "general", "username": "carol"}, "forbidden")
    await ok(root, "moderator", {"room": "general", "username": "alice", "on": True})
    await ok(alice, "mute", {"room": "general", "username": "carol", "seconds": 5})


async def test_targets_are_one_member_or_one_username_that_exists(chat):
    _, alice, _ = await chat.account("alice")
    _, _, guest = await chat.guest()
    await ok(alice, "join", {"room": "den"})
    base = {"room": "den", "seconds": 5}
    await refused(alice, "mute", base, "invalid_request")
    await refused(alice, "mute", {**base, "member": guest["id"], "username": "alice"}, "invalid_request")
    await refused(alice, "mute", {**base, "member": 7}, "invalid_request")
    await refused(alice, "mute", {**base, "member": "x", "seconds": 86401}, "invalid_request")
    await refused(alice, "mute", {**base, "member": "x", "seconds": True}, "invalid_request")
    await refused(alice, "ban", {"room": "den", "member": "x"}, "invalid_request")  # `on` is required
    await refused(alice, "kick", {"room": "Den", "member": "x"}, "invalid_room")
    await refused(alice, "mute", {**base, "member": "nobody-here"}, "not_found")
    await refused(alice, "mute", {**base, "username": "nobody"}, "not_found")
    await refused(alice, "moderator", {"room": "den", "username": "nobody", "on": True}, "not_found")
    await ok(alice, "mute", {**base, "member": guest["id"]})


# -- mute, kick, ban -----------------------------------------------------------------------


async def test_a_mute_refuses_sending_there_until_it_ends_or_is_lifted(chat):
    _, alice, _ = await chat.account("alice")
    _, spammer, welcome = await chat.guest()
    await ok(alice, "join", {"room": "den"})
    await ok(spammer, "join", {"room": "den"})
    await ok(alice, "mute", {"room": "den", "member": welcome["id"], "seconds": 600})
    ack = await refused(spammer, "send chat", {"room": "den", "msg": "buy now"}, "muted")
    assert 599 <= ack["retry_after"] <= 600
    await ok(spammer, "send chat", {"room": "general", "msg": "only muted in den"})
    await ok(alice, "mute", {"room": "den", "member": welcome["id"], "seconds": 0})
    await ok(spammer, "send chat", {"room": "den", "msg": "sorry"})
    await ok(alice, "mute", {"room": "den", "member": welcome["id"], "seconds": 1})
    await refused(spammer, "send chat", {"room": "den", "msg": "again"}, "muted")
    await asyncio.sleep(1.05)
    await ok(spammer, "send chat", {"room": "den", "msg": "over"})


async def test_a_kick_takes_the_room_from_every_socket_of_the_account_and_it_may_come_back(chat):
    carol_visitor, carol, _ = await chat.account("carol")
    _, alice, _ = await chat.account("alice")
    _, root, _ = await chat.account("root")
    await ok(carol, "join", {"room": "den"})  # the owner: only an operator kicks her
    await ok(alice, "join", {"room": "den"})
    other_tab = await carol_visitor.socket()
    await other_tab.next("welcome")
    await asyncio.sleep(0.3)  # presence settles
    alice.drain("presence")

    started = time.monotonic()
    await ok(root, "kick", {"room": "den", "username": "carol"})
    for socket in (carol, other_tab):
        assert await socket.next("left", timeout=WITHIN) == {"room": "den", "reason": "kicked"}
    assert time.monotonic() - started < WITHIN
    event = await alice.next("presence", timeout=WITHIN + 1)
    assert event["room"] == "den" and [m["account"] for m in event["leaves"]] == ["carol"]
    await alice.nothing("left", wait=0.1)
    await refused(carol, "send chat", {"room": "den", "msg": "hi"}, "not_in_room")
    await ok(carol, "join", {"room": "den"})  # a kick is not a ban


async def test_a_ban_keeps_a_guest_out_of_join_history_and_the_directory_until_lifted(chat):
    _, alice, _ = await chat.account("alice")
    _, guest, welcome = await chat.guest()
    await ok(alice, "join", {"room": "den"})
    await ok(guest, "join", {"room": "den"})
    await ok(alice, "send chat", {"room": "den", "msg": "hello"})
    assert [r["room"] for r in (await ok(guest, "rooms", {}))["rooms"]] == ["den", "general"]

    await ok(alice, "ban", {"room": "den", "member": welcome["id"], "on": True})
    assert await guest.next("left", timeout=WITHIN) == {"room": "den", "reason": "banned"}
    await refused(guest, "join", {"room": "den"}, "banned")
    await refused(guest, "history", {"room": "den"}, "banned")
    assert [r["room"] for r in (await ok(guest, "rooms", {}))["rooms"]] == ["general"]
    assert [r["room"] for r in (await ok(alice, "rooms", {}))["rooms"]] == ["general", "den"]  # 2, then 1

    await ok(alice, "ban", {"room": "den", "member": welcome["id"], "on": False})
    await ok(guest, "join", {"room": "den"})
    assert [m["msg"] for m in (await ok(guest, "history", {"room": "den"}))["messages"]] == ["hello"]


async def test_moderators_delete_any_message_there_and_the_log_keeps_its_id_not_its_text(chat):
    _, alice, _ = await chat.account("alice")  # the owner
    _, bob, _ = await chat.account("bob")
    _, guest, welcome = await chat.guest()
    for socket in (alice, bob, guest):
        await ok(socket, "join", {"room": "den"})
    sent = await ok(guest, "send chat", {"room": "den", "msg": "secret spam"})
    mine = await ok(alice, "send chat", {"room": "den", "msg": "mine"})
    await refused(bob, "delete chat", {"room": "den", "id": sent["id"]}, "forbidden")
    deleted = await ok(alice, "delete chat", {"room": "den", "id": sent["id"]})
    event = await receive(guest, "chat deleted", lambda e: e["id"] == sent["id"])
    assert event == {"room": "den", "id": sent["id"], "rev": deleted["rev"]}
    await ok(alice, "delete chat", {"room": "den", "id": mine["id"]})  # its own: not a moderation action
    log = await chat.storage_audit()
    assert [(e["actor"], e["action"], e["room"], e["message_id"]) for e in log] == [
        ("alice", "delete", "den", sent["id"])
    ]
    assert "secret spam" not in repr(log)
    # A muted author cannot edit its messages there either.
    again = await ok(guest, "send chat", {"room": "den", "msg": "first"})
    await ok(alice, "mute", {"room": "den", "member": welcome["id"], "seconds": 60})
    ack = await refused(guest, "edit chat", {"room": "den", "id": again["id"], "msg": "edited"}, "muted")
    assert 59 <= ack["retry_after"] <= 60


# -- topics and the directory -----------------------------------------------------------------


async def test_topics_are_set_by_moderators_and_reach_the_room(chat):
    _, alice, _ = await chat.account("alice")
    _, bob, _ = await chat.account("bob")
    await refused(alice, "topic", {"room": "den", "topic": "x"}, "not_in_room")
    await ok(alice, "join", {"room": "den"})
    await ok(bob, "join", {"room": "den"})
    await refused(bob, "topic", {"room": "den", "topic": "mine"}, "forbidden")
    await refused(alice, "topic", {"room": "den", "topic": "x" * 201}, "invalid_request")
    await refused(alice, "topic", {"room": "den"}, "invalid_request")
    await ok(alice, "topic", {"room": "den", "topic": "  " + "t" * 200 + "  "})  # trimmed first
    await ok(alice, "topic", {"room": "den", "topic": "  Cats & dogs  "})
    assert await bob.next("room updated", timeout=WITHIN) == {"room": "den", "topic": "t" * 200}
    assert await bob.next("room updated", timeout=WITHIN) == {"room": "den", "topic": "Cats & dogs"}
    _, carol, _ = await chat.account("carol")
    assert (await ok(carol, "join", {"room": "den"}))["topic"] == "Cats & dogs"
    listed = (await ok(carol, "rooms", {"query": "den"}))["rooms"]
    assert [(r["room"], r["topic"]) for r in listed] == [("den", "Cats & dogs")]


async def test_the_directory_counts_sorts_filters_and_leaves_out_direct_rooms(chat):
    _, alice, _ = await chat.account("alice")
    _, bob, _ = await chat.account("bob")
    _, guest, _ = await chat.guest()
    for room in ("b-room", "a-room", "quiet"):
        await ok(alice, "join", {"room": room})
    await ok(bob, "join", {"room": "b-room"})
    await ok(guest, "join", {"room": "b-room"})
    await ok(bob, "join", {"room": "a-room"})
    await ok(alice, "join", {"room": "@alice+bob"})
    before = time.time()
    await ok(bob, "send chat", {"room": "a-room", "msg": "hi"})
    await ok(alice, "leave", {"room": "quiet"})  # nobody has it any more
    await asyncio.sleep(0.3)  # presence settles

    rooms = (await ok(guest, "rooms", {}))["rooms"]
    assert [(r["room"], r["members"], r["online"]) for r in rooms] == [
        ("b-room", 3, 3), ("general", 3, 3), ("a-room", 2, 2)  # by members, then name
    ]  # fmt: skip
    assert rooms[2]["last_ts"] >= before and rooms[0]["last_ts"] is None and rooms[0]["topic"] == ""
    assert [r["room"] for r in (await ok(guest, "rooms", {"query": "ROOM", "limit": 1}))["rooms"]] == ["b-room"]
    assert (await ok(guest, "rooms", {"query": "@alice"}))["rooms"] == []
    assert (await ok(guest, "rooms", {"query": "%"}))["rooms"] == []
    await refused(guest, "rooms", {"query": "x" * 33}, "invalid_request")
    await refused(guest, "rooms", {"limit": 101}, "invalid_request")
    await refused(guest, "rooms", {"limit": "5"}, "invalid_request")
    await refused(guest, "rooms", [], "invalid_request")


# -- direct rooms ------------------------------------------------------------------------------


async def test_a_direct_room_is_between_its_two_accounts_only(chat):
    _, alice, _ = await chat.account("alice")
    bob_visitor, bob, _ = await chat.account("bob")
    bob2 = await bob_visitor.socket()
    await bob2.next("welcome")
    _, eve, _ = await chat.account("eve")
    _, root, _ = await chat.account("root")
    _, guest, _ = await chat.guest()

    for name in ("@bob+alice", "@alice+alice", "@Alice+bob", "@al+bob", "@alice+bob\n"):
        await refused(alice, "join", {"room": name}, "invalid_room")
    await refused(alice, "join", {"room": "@alice+nobody"}, "not_found")
    ack = await ok(alice, "join", {"room": "@alice+bob"})
    assert ack["topic"] == "" and ack["history"] == []
    for socket in (bob, bob2):  # added to the other account's rooms too
        assert await socket.next("joined", timeout=WITHIN) == {"room": "@alice+bob"}
    for outsider in (eve, root, guest):
        for event, payload in (
            ("join", {"room": "@alice+bob"}),
            ("send chat", {"room": "@alice+bob", "msg": "let me in"}),
            ("history", {"room": "@alice+bob"}),
        ):
            await refused(outsider, event, payload, "forbidden")
    # Moderation does not apply, not even an operator's.
    await refused(root, "kick", {"room": "@alice+bob", "username": "bob"}, "forbidden")
    await refused(alice, "topic", {"room": "@alice+bob", "topic": "us"}, "forbidden")

    await ok(alice, "send chat", {"room": "@alice+bob", "msg": "psst"})
    assert (await bob.next("new chat", timeout=WITHIN))["msg"] == "psst"
    for outsider in (eve, root, guest):
        await outsider.nothing("new chat", wait=0.1)
    assert [m["msg"] for m in (await ok(bob, "history", {"room": "@alice+bob"}))["messages"]] == ["psst"]

    # Leaving takes it from the leaver only; a new message brings it back.
    await ok(bob, "leave", {"room": "@alice+bob"})
    assert await bob2.next("left", timeout=WITHIN) == {"room": "@alice+bob", "reason": "left"}
    await ok(alice, "send chat", {"room": "@alice+bob", "msg": "still there?"})
    for socket in (bob, bob2):
        assert await socket.next("joined", timeout=WITHIN) == {"room": "@alice+bob"}
    ack = await ok(bob, "join", {"room": "@alice+bob"})
    assert [m["msg"] for m in ack["history"]] == ["psst", "still there?"]


# -- the audit log ------------------------------------------------------------------------------


async def test_python_m_chatd_audit_prints_the_actions_newest_first(chat, data_dir, request):
    _, alice, _ = await chat.account("alice")
    _, bob, _ = await chat.account("bob")
    _, guest, welcome = await chat.guest()
    for socket in (alice, bob, guest):
        await ok(socket, "join", {"room": "den"})
    await ok(alice, "moderator", {"room": "den", "username": "bob", "on": True})
    await ok(bob, "mute", {"room": "den", "member": welcome["id"], "seconds": 60})
    await ok(bob, "kick", {"room": "den", "member": welcome["id"]})
    await ok(alice, "ban", {"room": "den", "username": "bob", "on": True})
    await ok(alice, "topic", {"room": "den", "topic": "secret words"})
    await ok(alice, "join", {"room": "other"})
    await ok(alice, "topic", {"room": "other", "topic": "elsewhere"})

    if TEST_BACKEND == "postgres":
        place = ["--database-url", request.getfixturevalue("pg_database_url")]
    else:
        place = ["--data-dir", str(data_dir)]

    def audit(*args: str) -> list[list[str]]:
        done = subprocess.run(
            [sys.executable, "-m", "chatd", "audit", *place, *args], cwd=ROOT, capture_output=True, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return [line.split("\t")[1:] for line in done.stdout.splitlines()]

    guest_name = "guest " + welcome["id"]
    assert await asyncio.to_thread(audit, "--room", "den") == [
        ["alice", "topic", "-", "den"],  # never the topic's words
        ["alice", "ban", "bob", "den"],
        ["bob", "kick", guest_name, "den"],
        ["bob", "mute", guest_name, "den", "60s"],
        ["alice", "moderator", "bob", "den", "on"],
    ]
    assert await asyncio.to_thread(audit, "--limit", "2") == [
        ["alice", "topic", "-", "other"], ["alice", "topic", "-", "den"]
    ]  # fmt: skip


# -- --operator --------------------------------------------------------------------------------


def test_operators_come_from_repeated_flags_or_a_comma_separated_variable():
    from chatd.config import ConfigError, config_from_args

    assert config_from_args(["--operator", "Ada", "--operator", "grace"], environ={}).operators == ("ada", "grace")
    assert config_from_args([], environ={"CHATD_OPERATOR": "ada, Bob.b"}).operators == ("ada", "bob.b")
    assert config_from_args(["--operator", "x_y"], environ={"CHATD_OPERATOR": "ada"}).operators == ("x_y",)
    assert config_from_args([], environ={}).operators == ()
    with pytest.raises(ConfigError, match="--operator"):
        config_from_args(["--operator", "no spaces"], environ={})


async def test_odd_payloads_get_an_error_code_and_never_an_internal_error(chat):
    _, alice, _ = await chat.account("alice")
    await ok(alice, "join", {"room": "den"})
    odd = [None, [], "den", 5, {}, {"room": None}, {"room": 5}, {"room": "den", "member": ""},
           {"room": "den", "username": "", "seconds": 1, "on": 1}, {"room": "@alice+bob", "topic": "x"},
           {"room": "den", "member": "a" * 65, "on": False}, {"room": "den", "username": "alice\x00", "on": True},
           {"room": "den", "topic": "\ud800", "query": "\ud800"}, {"room": "den", "topic": "a\x00", "query": "\x00"},
           {"query": 5}, {"query": "%_", "limit": 0}]  # fmt: skip
    for event in ("rooms", "topic", "moderator", "mute", "kick", "ban"):
        for payload in odd:
            ack = await alice.call(event, payload)
            assert ack["ok"] is True or ack["error"] in {
                "invalid_request", "invalid_room", "not_found", "forbidden", "not_in_room"
            }, (event, payload, ack)  # fmt: skip
    assert (await alice.call("send chat", {"room": "den", "msg": "still fine"}))["ok"] is True
