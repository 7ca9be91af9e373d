"""One suite for every storage backend: each test runs on SQLite and on PostgreSQL
(a throwaway server, see pg_service.py), against real databases."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from chatd.config import DATABASE_FILE_NAME
from chatd.storage import COUNT_CAP, MAX_ID, MAX_ROOMS, TABLES, Account, StorageError, TooManyRooms
from chatd.storage import postgres as pg_module
from chatd.storage import sqlite as sqlite_module
from chatd.storage.copy import open_storage
from conftest import ROOT, Visitor, free_port, refusal
from engineio_clients import RawPollingClient
from pg_service import create_database, start_postgres

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def place(request, backend, tmp_path) -> str:
    """Where a storage lives: a data dir, or a fresh PostgreSQL database's URL."""
    return str(tmp_path / "data") if backend == "sqlite" else request.getfixturevalue("pg_database_url")


@pytest.fixture
async def open_at():
    """`await open_at(place)` → an open storage, closed after the test."""
    opened = []

    async def open_(where: str):
        storage = open_storage(where)
        await storage.open()
        opened.append(storage)
        return storage

    yield open_
    for storage in opened:
        await storage.close()


@pytest.fixture
async def storage(place, open_at):
    return await open_at(place)


async def add(storage, room: str, n: int, prefix: str = "m") -> list[dict]:
    return [await storage.add_message(room, "alice", "alice", f"{prefix}{i}", 1.5 + i) for i in range(n)]


def ids(messages: list[dict]) -> list[int]:
    return [m["id"] for m in messages]


# -- rooms of a person, read markers, mentions ---------------------------------------


def state(room: str, last_id: int, read_id: int, unread: int = 0, mentions: int = 0) -> dict:
    return {"room": room, "last_id": last_id, "read_id": read_id, "unread": unread, "mentions": mentions}


async def test_a_new_owner_is_in_general_read_up_to_now_and_rooms_are_kept_per_owner(storage):
    await add(storage, "general", 3)
    assert await storage.room_states("s:guest1") == [state("general", 3, 3)]
    assert await storage.join_room("a:alice", "zoo") is True
    assert await storage.join_room("a:alice", "zoo") is False  # joined already: nothing changes
    assert await storage.join_room("a:alice", "abc") is True
    assert [s["room"] for s in await storage.room_states("a:alice")] == ["abc", "general", "zoo"]  # by name
    assert await storage.room_states("s:guest1", "zoo") == []  # another owner's rooms are its own
    assert await storage.leave_room("a:alice", "general") is True
    assert await storage.leave_room("a:alice", "general") is False
    # Left general: it does not come back, and an owner in no room at all stays there.
    assert [s["room"] for s in await storage.room_states("a:alice")] == ["abc", "zoo"]
    for room in ("abc", "zoo"):
        await storage.leave_room("a:alice", room)
    assert await storage.room_states("a:alice") == []
    assert await storage.leave_room("s:guest2", "general") is True  # never seen: seeded, then left
    assert await storage.room_states("s:guest2") == []


async def test_tabs_of_a_new_owner_opened_at_once_are_each_in_general(storage):
    """A new owner's handshakes at the same moment (PostgreSQL: on different connections, one
    seeding while the others read) each get general, not the empty list read before the seed."""
    await add(storage, "general", 2)
    for i in range(20):
        tabs = await asyncio.gather(*(storage.room_states(f"s:tabs{i}") for _ in range(3)))
        assert tabs == [[state("general", 2, 2)]] * 3, i


async def test_handshakes_that_arrive_together_each_get_their_own_rooms(storage):
    """Handshakes read their rooms together (SQLite: one trip, one commit for the new owners
    among them): each gets its owner's rooms, a repeat of a new owner seeds it once."""
    await add(storage, "general", 2)
    await storage.join_room("a:old", "zoo")
    await storage.leave_room("a:old", "general")
    await storage.leave_room("a:none", "general")
    owners = ["s:new1", "a:old", "s:new1", "a:none", "s:new2", "a:old"]
    found = await asyncio.gather(*(storage.room_states(owner) for owner in owners))
    expected = {"s:new1": [state("general", 2, 2)], "s:new2": [state("general", 2, 2)],
                "a:old": [state("zoo", 0, 0)], "a:none": []}  # fmt: skip
    assert found == [expected[owner] for owner in owners]
    assert await storage.join_room("s:new1", "general") is False  # in general once
    assert await storage.room_states("a:none") == []  # in no room: not put back in general


async def test_at_most_50_rooms_general_included(storage):
    for i in range(MAX_ROOMS - 1):
        assert await storage.join_room("a:bob", f"r{i}") is True
    assert len(await storage.room_states("a:bob")) == MAX_ROOMS  # general and 49 more
    with pytest.raises(TooManyRooms):
        await storage.join_room("a:bob", "one-more")
    assert await storage.join_room("a:bob", "r0") is False  # a joined room is still fine
    await storage.leave_room("a:bob", "r0")
    assert await storage.join_room("a:bob", "one-more") is True


async def test_unread_counts_others_messages_after_the_marker_up_to_1000(storage):
    await storage.join_room("a:amy", "r")
    await storage.add_message("r", "amy", "amy", "mine", 0.0, author="a:amy")
    assert await storage.room_states("a:amy", "r") == [state("r", 1, 1)]  # sending moved the marker
    for i in range(3):
        await storage.add_message("r", "guest-1", None, f"m{i}", 0.0, author="s:g1")
    assert await storage.room_states("a:amy", "r") == [state("r", 4, 1, unread=3)]
    await storage.add_message("r", "amy", "amy", "mine again", 0.0, author="a:amy")
    assert await storage.room_states("a:amy", "r") == [state("r", 5, 5)]
    await asyncio.gather(*(storage.add_message("r", "g", None, "x", 0.0, author="s:g1") for _ in range(COUNT_CAP + 5)))
    assert (await storage.room_states("a:amy", "r"))[0]["unread"] == COUNT_CAP
    # Only others' messages count: one of amy's own past her marker (as a copy of old data may hold) does not.
    await storage.join_room("a:amy", "copied")
    await storage.load("messages", [("copied", 1, "amy", "amy", "old", 0.0, 1, None, "a:amy", 0, None)])
    await storage.load("messages", [("copied", 2, "g", None, "old", 0.0, 2, None, "s:g1", 0, None)])
    await storage.load("room_counters", [("copied", 2, 2)])
    assert await storage.room_states("a:amy", "copied") == [state("copied", 2, 0, unread=1)]


async def test_read_moves_the_marker_forward_only_and_never_past_the_last_message(storage):
    await storage.join_room("s:g", "r")
    await add(storage, "r", 5)
    assert await storage.mark_read("s:g", "r", 3) == (state("r", 5, 3, unread=2), True)
    assert await storage.mark_read("s:g", "r", 2) == (state("r", 5, 3, unread=2), False)  # never back
    assert await storage.mark_read("s:g", "r", 3) == (state("r", 5, 3, unread=2), False)
    assert await storage.mark_read("s:g", "r", MAX_ID) == (state("r", 5, 5), True)  # beyond last_id: last_id
    assert await storage.mark_read("s:g", "elsewhere", 1) is None  # not among its rooms
    assert await storage.mark_read("s:other", "r", 1) is None


async def test_mentions_are_kept_with_the_message_and_counted_per_account(storage):
    await storage.join_room("a:amy", "r")
    await storage.join_room("a:bob", "r")
    stored = await storage.add_message("r", "bob", "bob", "hi @amy @bob", 0.0, author="a:bob", mentions=["Amy", "bob"])
    assert stored["mentions"] == ["Amy", "bob"]
    await storage.add_message("r", "g", None, "@amy again", 0.0, author="s:g", mentions=["Amy"])
    assert (await storage.history("r"))[0]["mentions"] == ["Amy", "bob"]
    assert await storage.room_states("a:amy", "r") == [state("r", 2, 0, unread=2, mentions=2)]
    # Bob's own message does not count for him, even though it names him.
    assert await storage.room_states("a:bob", "r") == [state("r", 2, 1, unread=1, mentions=0)]
    await storage.mark_read("a:amy", "r", 1)
    assert (await storage.room_states("a:amy", "r"))[0]["mentions"] == 1
    await storage.create_account("Amy", "h")
    await storage.create_account("bob", "h")
    assert await storage.usernames(["amy", "nobody", "bob"]) == {"amy": "Amy", "bob": "bob"}


async def test_a_deleted_message_stops_counting_and_an_edit_recomputes_mentions(storage):
    await storage.join_room("a:amy", "r")
    first = await storage.add_message("r", "bob", "bob", "hi @amy", 0.0, author="a:bob", mentions=["Amy"])
    second = await storage.add_message("r", "bob", "bob", "plain", 0.0, author="a:bob")
    assert await storage.room_states("a:amy", "r") == [state("r", 2, 0, unread=2, mentions=1)]
    # An edit that removes the mention takes it off the count; one that adds it puts it on.
    edited = await storage.edit_message("r", second["id"], "a:bob", "now @amy", 1.0, ["Amy"])
    assert edited["mentions"] == ["Amy"]
    assert await storage.room_states("a:amy", "r") == [state("r", 2, 0, unread=2, mentions=2)]
    edited = await storage.edit_message("r", first["id"], "a:bob", "hi all", 2.0, [])
    assert edited["mentions"] == []
    assert [m["mentions"] for m in await storage.history("r")] == [[], ["Amy"]]
    assert await storage.room_states("a:amy", "r") == [state("r", 2, 0, unread=2, mentions=1)]
    # A deleted message is no longer unread, and its mention goes with it.
    await storage.delete_message("r", second["id"], "a:bob")
    assert await storage.room_states("a:amy", "r") == [state("r", 2, 0, unread=1, mentions=0)]
    await storage.delete_message("r", first["id"], "a:bob")
    assert await storage.room_states("a:amy", "r") == [state("r", 2, 0)]
    assert await storage.count("mentions") == 0  # erased, not only left out
    # A repeated send (a kept client_id) records no mention and moves no marker.
    await storage.join_room("a:bob", "r")
    now = time.time()  # a client_id is kept for a day from its send
    sent = await storage.add_message("r", "amy", "amy", "@bob", now, author="a:amy", client_id="c1", mentions=["bob"])
    await storage.add_message("r", "bob", "bob", "hello", now, author="a:bob")
    again = await storage.add_message("r", "amy", "amy", "@bob", now, author="a:amy", client_id="c1", mentions=["bob"])
    assert again == {"room": "r", "id": sent["id"], "rev": sent["rev"], "duplicate": True}
    assert await storage.count("mentions") == 1
    assert await storage.room_states("a:amy", "r") == [state("r", 4, 3, unread=1)]
    assert await storage.room_states("a:bob", "r") == [state("r", 4, 4)]


# -- messages -----------------------------------------------------------------------


async def test_add_message_returns_the_message_with_per_room_gapless_ids(storage):
    first = await storage.add_message("general", "guest-1234", None, "hello", 1700000000.25)
    assert first == {"id": 1, "room": "general", "name": "guest-1234", "account": None, "msg": "hello",
                     "ts": 1700000000.25, "rev": 1, "edited": None, "mentions": []}  # fmt: skip
    assert ids(await add(storage, "general", 3)) == [2, 3, 4]
    assert ids(await add(storage, "other", 2)) == [1, 2]  # every room counts from 1
    assert ids(await add(storage, "general", 1)) == [5]


async def test_ids_stay_below_2_to_the_63(storage):
    await storage.load("room_counters", [("full", MAX_ID - 1, 1)])
    assert (await storage.add_message("full", "n", None, "last", 0.0))["id"] == MAX_ID
    with pytest.raises(StorageError):
        await storage.add_message("full", "n", None, "one too many", 0.0)
    assert ids(await storage.history("full")) == [MAX_ID]
    assert (await storage.add_message("other", "n", None, "fine", 0.0))["id"] == 1


async def test_messages_come_back_exactly_as_stored(storage):
    odd = "null\x00byte, \u202eright-to-left\u202c, emoji 😀, 'quotes\" and \\ backslash"
    stored = await storage.add_message("r", "bob", "bob", odd, 1234567890.123456789)
    [read] = await storage.history("r")
    assert read == stored and read["msg"] == odd and read["ts"] == 1234567890.123456789


async def test_history_is_empty_for_an_unknown_room(storage):
    assert await storage.history("nobody-here") == []
    assert await storage.history("nobody-here", before=10) == []
    assert await storage.history("nobody-here", after=0) == []


async def test_history_pages_at_the_edges(storage):
    await add(storage, "r", 10)
    await add(storage, "noise", 5)
    assert ids(await storage.history("r")) == list(range(1, 11))  # fewer than the limit: all, oldest first
    assert ids(await storage.history("r", limit=3)) == [8, 9, 10]  # the latest
    assert ids(await storage.history("r", limit=1)) == [10]
    assert ids(await storage.history("r", before=5, limit=3)) == [2, 3, 4]
    assert ids(await storage.history("r", before=3, limit=3)) == [1, 2]  # a short first page
    assert ids(await storage.history("r", before=1)) == []
    assert ids(await storage.history("r", before=0)) == []
    assert ids(await storage.history("r", before=MAX_ID, limit=2)) == [9, 10]
    assert ids(await storage.history("r", after=0, limit=3)) == [1, 2, 3]
    assert ids(await storage.history("r", after=7, limit=3)) == [8, 9, 10]
    assert ids(await storage.history("r", after=8, limit=3)) == [9, 10]  # a short last page
    assert ids(await storage.history("r", after=10)) == []
    assert ids(await storage.history("r", after=MAX_ID)) == []
    assert {m["room"] for m in await storage.history("r", after=0, limit=100)} == {"r"}


async def test_paging_before_walks_the_whole_room_back(storage):
    await add(storage, "r", 25)
    seen, before = [], None
    while page := await storage.history("r", before=before, limit=7):
        seen = page + seen
        before = page[0]["id"]
    assert ids(seen) == list(range(1, 26))


async def test_every_ack_is_readable_from_another_connection(place, open_at):
    """Group commit: messages sent together share transactions, but none is answered before its commit."""
    writer, reader = await open_at(place), await open_at(place)

    async def send_and_check(i: int) -> int:
        message = await writer.add_message("r", "alice", None, f"m{i}", float(i))
        assert message["id"] in ids(await reader.history("r", after=message["id"] - 1, limit=1))
        return message["id"]

    assert sorted(await asyncio.gather(*(send_and_check(i) for i in range(60)))) == list(range(1, 61))


async def test_messages_sent_together_share_a_transaction(pg_database_url, open_at):
    storage = await open_at(pg_database_url)
    await asyncio.gather(*(storage.add_message("r", "a", None, f"m{i}", 0.0) for i in range(100)))
    # Rows written by one transaction carry its id in xmin.
    conn = await pg_module.asyncpg.connect(pg_database_url)
    try:
        transactions = await conn.fetchval("SELECT count(DISTINCT xmin::text) FROM messages")
    finally:
        await conn.close()
    assert transactions <= 3  # the first alone, then the rest in one or two batches


async def test_twenty_concurrent_writers_on_two_connections_get_every_id_once(place, open_at):
    first, second = await open_at(place), await open_at(place)

    async def writer(storage, w: int) -> list[int]:
        return [(await storage.add_message("busy", f"w{w}", None, f"{w}-{i}", 0.0))["id"] for i in range(20)]

    per_writer = await asyncio.gather(*(writer(first if w % 2 else second, w) for w in range(20)))
    for acked in per_writer:
        assert acked == sorted(acked)  # one writer's messages get increasing ids
    assert sorted(i for acked in per_writer for i in acked) == list(range(1, 401))
    assert ids(await first.history("busy", after=0, limit=100)) == list(range(1, 101))


# -- accounts and sessions ----------------------------------------------------------------


async def test_usernames_are_unique_without_regard_to_case(storage):
    assert await storage.create_account("Alice_1", "hash-1") is True
    assert await storage.create_account("alice_1", "hash-2") is False
    assert await storage.create_account("ALICE_1", "hash-3") is False
    for spelling in ("Alice_1", "alice_1", "ALICE_1", "aLiCe_1"):
        assert await storage.find_account(spelling) == Account("Alice_1", "hash-1")
    assert await storage.find_account("bob") is None
    assert await storage.create_account("bob", "hash-4") is True
    assert await storage.find_account("BOB") == Account("bob", "hash-4")


async def test_revocation_and_pruning(storage):
    now = int(time.time())
    assert await storage.is_revoked("s1") is False
    await storage.revoke_session("s1", now + 100)
    assert await storage.is_revoked("s1") is True
    await storage.revoke_session("s2", now - 1)  # its cookie has expired already: nothing to guard
    assert await storage.is_revoked("s2") is False
    await storage.load("revoked_sessions", [("expired", now - 10), ("later", now + 10)])
    assert await storage.is_revoked("expired") is True  # kept until the next revocation prunes it
    await storage.revoke_session("s3", now + 100)
    assert [await storage.is_revoked(s) for s in ("expired", "later", "s1", "s3")] == [False, True, True, True]
    await storage.revoke_session("s1", now + 200)  # again: no error, a later until
    assert await storage.is_revoked("s1") is True
    assert await storage.count("revoked_sessions") == 3


async def test_revocations_survive_a_reopen(place, open_at):
    first = await open_at(place)
    await first.revoke_session("kept", int(time.time()) + 100)
    await first.close()
    assert await (await open_at(place)).is_revoked("kept") is True


async def test_mutes_and_bans_are_kept_and_survive_a_reopen(place, open_at):
    """SQLite answers `sanction` from memory (every send asks): what it says must be what is stored."""
    first = await open_at(place)
    assert await first.sanction("r", "s:m1") == (0.0, False)
    await first.set_mute("r", "s:m1", 99.5)
    await first.set_ban("r", "s:m1", True)
    await first.set_ban("r", "a:zed", True)
    await first.set_ban("r", "a:zed", False)
    await first.set_mute("other", "s:m1", 5.0)
    expected = {("r", "s:m1"): (99.5, True), ("r", "a:zed"): (0.0, False), ("other", "s:m1"): (5.0, False),
                ("r", "s:nobody"): (0.0, False)}  # fmt: skip
    assert {key: await first.sanction(*key) for key in expected} == expected
    await first.close()
    again = await open_at(place)
    assert {key: await again.sanction(*key) for key in expected} == expected


async def test_a_revocation_is_seen_at_once_by_another_postgresql_connection(pg_database_url, open_at):
    one, two = await open_at(pg_database_url), await open_at(pg_database_url)
    assert await two.is_revoked("s") is False
    await one.revoke_session("s", int(time.time()) + 100)
    assert await two.is_revoked("s") is True


async def test_sqlite_is_revoked_answers_without_touching_the_database(tmp_path, open_at):
    storage = await open_at(str(tmp_path / "data"))
    await storage.revoke_session("s", int(time.time()) + 100)
    # Closing the connection underneath: a lookup that went to the database would fail.
    db = storage._db
    storage._db = None
    try:
        assert await storage.is_revoked("s") is True and await storage.is_revoked("other") is False
    finally:
        storage._db = db


# -- health ---------------------------------------------------------------------------


async def test_ping_answers_while_open_and_fails_when_closed(place):
    storage = open_storage(place)
    await storage.open()
    await storage.ping()
    await storage.close()
    with pytest.raises(StorageError):
        await storage.ping()


# -- bulk access ----------------------------------------------------------------------------


async def test_dump_load_count_and_clear(place, open_at):
    storage = await open_at(place)
    rows = {
        "accounts": [("Zed", "zed", "h1", 1.0), ("amy", "amy", "h2", 2.0)],
        "messages": [
            ("b", 7, "n", None, "x\x00", 0.5, 9, 3.5, "s:1", 0, None),
            ("a", 2, "", None, "", 1.5, 4, None, None, 1, None),  # a deletion's tombstone
            ("a", 3, "n", "amy", "y @zed", 3.5, 5, None, "a:amy", 0, '["Zed"]'),
            ("a", 1, "n", None, "z", 2.5, 1, None, "s:m1", 0, None),
        ],
        "room_counters": [("a", 3, 5), ("b", 7, 9)],
        "client_ids": [("s:1", "b", "c-1", 7, 9, float(int(time.time())))],  # kept for a day from now
        "revoked_sessions": [("s2", 10), ("s1", 2**40)],
        "room_owners": [("a:amy",), ("s:m1",)],
        "memberships": [("a:amy", "a", 2), ("a:amy", "general", 0), ("s:m1", "a", 1)],
        "mentions": [("zed", "a", 2)],
        "room_info": [("a", "amy", "about a"), ("b", None, "")],
        "moderators": [("a", "zed")],
        "sanctions": [("a", "s:m1", 12.5, 1)],
        "audit": [(1, 3.5, "amy", "ban", "guest m1", "a", None, None), (2, 4.5, "amy", "delete", None, "a", 1, None)],
    }
    for table in TABLES:
        await storage.load(table, rows[table])
    for table in TABLES:
        assert await storage.count(table) == len(rows[table])
        dumped = [row async for batch in storage.dump(table, batch_size=2) for row in batch]
        key = {"accounts": lambda r: r[1], "messages": lambda r: (r[0], r[1])}.get(table, lambda r: r)
        if table == "messages":  # PostgreSQL's deleted is a boolean, SQLite's 0/1: equal either way
            dumped = [(*r[:9], int(r[9]), *r[10:]) for r in dumped]
        assert dumped == sorted(rows[table], key=key)
    assert await storage.is_revoked("s1") is True
    assert await storage.sanction("a", "s:m1") == (12.5, True)  # loaded sanctions hold at once
    next_ = await storage.add_message("b", "n", None, "next", 0.0)
    assert (next_["id"], next_["rev"]) == (8, 10)  # counters are loaded too
    assert (await storage.history("a", since=0)) == [
        {"id": 1, "room": "a", "name": "n", "account": None, "msg": "z", "ts": 2.5, "rev": 1, "edited": None, "mentions": []},
        {"room": "a", "id": 2, "rev": 4, "deleted": True},
        {"id": 3, "room": "a", "name": "n", "account": "amy", "msg": "y @zed", "ts": 3.5, "rev": 5, "edited": None,
         "mentions": ["Zed"]},
    ]
    repeat = await storage.add_message("b", "m", None, "x", 1.0, author="s:1", client_id="c-1")
    assert repeat == {"room": "b", "id": 7, "rev": 9, "duplicate": True}
    await storage.record("amy", "kick", "zed", "a")  # the audit log goes on after the copied lines
    assert [e["action"] for e in await storage.audit()] == ["kick", "delete", "ban"]
    await storage.clear()
    assert [await storage.count(table) for table in TABLES] == [0] * len(TABLES)
    assert await storage.is_revoked("s1") is False
    assert await storage.sanction("a", "s:m1") == (0.0, False)
    assert (await storage.add_message("b", "n", None, "again", 0.0))["id"] == 1


# -- migrations ----------------------------------------------------------------------------


def make_sqlite_v1(data_dir: Path) -> None:
    """A database as chatd's first schema left it: one global id sequence, gaps per room."""
    data_dir.mkdir(parents=True)
    db = sqlite3.connect(data_dir / DATABASE_FILE_NAME)
    for statement in sqlite_module.MIGRATIONS[0]:
        db.execute(statement)
    db.executemany(
        "INSERT INTO messages (id, room, name, account, msg, ts) VALUES (?, ?, 'n', NULL, ?, 1.0)",
        [(1, "a", "a1"), (2, "b", "b2"), (3, "a", "a3"), (4, "a", "a4"), (7, "b", "b7")],
    )
    db.execute("INSERT INTO accounts VALUES ('Amy', 'amy', 'hash', 1.0)")
    db.execute("INSERT INTO revoked_sessions VALUES ('old-sid', ?)", (int(time.time()) + 100,))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


async def test_sqlite_schema_1_migrates_forward_keeping_ids_and_counting_on(tmp_path, open_at):
    make_sqlite_v1(tmp_path / "data")
    storage = await open_at(str(tmp_path / "data"))
    assert [(m["id"], m["msg"]) for m in await storage.history("a")] == [(1, "a1"), (3, "a3"), (4, "a4")]
    assert ids(await storage.history("b")) == [2, 7]  # old ids keep their gaps
    assert (await storage.add_message("a", "n", None, "new", 2.0))["id"] == 5
    assert (await storage.add_message("b", "n", None, "new", 2.0))["id"] == 8
    assert (await storage.add_message("c", "n", None, "new", 2.0))["id"] == 1
    assert await storage.find_account("AMY") == Account("Amy", "hash")
    assert await storage.is_revoked("old-sid") is True
    version = sqlite3.connect(tmp_path / "data" / DATABASE_FILE_NAME).execute("PRAGMA user_version").fetchone()
    assert version == (sqlite_module.SCHEMA_VERSION,)


async def test_every_schema_version_migrates_to_the_latest(place, open_at, backend):
    """From an empty database through every migration, and a reopen at the latest is a no-op."""
    storage = await open_at(place)
    await add(storage, "r", 3)
    await storage.close()
    again = await open_at(place)
    assert ids(await again.history("r")) == [1, 2, 3]
    assert (await again.add_message("r", "n", None, "x", 0.0))["id"] == 4


async def test_a_database_from_a_newer_chatd_is_refused(place, backend):
    storage = open_storage(place)
    await storage.open()
    await storage.close()
    if backend == "sqlite":
        db = sqlite3.connect(Path(place) / DATABASE_FILE_NAME)
        db.execute("PRAGMA user_version = 99")
        db.commit()
        db.close()
    else:
        conn = await pg_module.asyncpg.connect(place)
        await conn.execute("UPDATE chatd_schema SET version = 99")
        await conn.close()
    with pytest.raises(StorageError, match="newer chatd"):
        await open_storage(place).open()


async def test_openers_racing_on_an_empty_database_migrate_it_once(place, open_at):
    storages = await asyncio.gather(*(open_at(place) for _ in range(4)))
    messages = await asyncio.gather(*(s.add_message("r", "n", None, "m", 0.0) for s in storages))
    assert sorted(ids(messages)) == [1, 2, 3, 4]


def test_two_processes_racing_on_an_empty_postgresql_database_both_start(pg_database_url, tmp_path):
    script = (
        "import asyncio, sys\nfrom chatd.storage.postgres import PostgresStorage\n"
        "async def main():\n    s = PostgresStorage(sys.argv[1]); await s.open(); await s.close()\n"
        "asyncio.run(main())\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, pg_database_url], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]  # fmt: skip
    results = [(p.wait(30), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    assert results == [(0, "")] * 3


# -- one process per SQLite data dir ------------------------------------------------------


def test_a_second_process_on_the_same_sqlite_data_dir_exits_2(chatd_process, data_dir):
    first = chatd_process(env={"CHATD_SECRET_KEYS": ""})
    first.start()
    second = subprocess.run(
        [sys.executable, "-m", "chatd", "--port", str(free_port()), "--data-dir", str(data_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another chatd process" in lines[0], second.stderr
    assert first.stop() == 0
    url = first.start()  # the lock went with the process
    with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
        assert response.status == 200
    assert first.stop() == 0


# -- PostgreSQL coming and going ---------------------------------------------------------------


def test_an_unreachable_or_refusing_database_stops_start_up_with_exit_2(tmp_path, pg_server):
    unreachable = f"postgresql://chatd:secret-pw@127.0.0.1:{free_port()}/chatd"
    missing_db = pg_server[0].rsplit("/", 1)[0] + "/no_such_database"
    for url in (unreachable, missing_db):
        result = subprocess.run(
            [sys.executable, "-m", "chatd", "--port", str(free_port()), "--data-dir", str(tmp_path / "d"),
             "--database-url", url],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot use database" in lines[0], result.stderr
        assert "secret-pw" not in result.stderr


@pytest.fixture
def own_pg_server():
    """A PostgreSQL of this test's own, to stop and start again."""
    server = start_postgres()
    yield server
    server.destroy()


async def test_chatd_rides_out_a_database_that_goes_away_and_comes_back(own_pg_server, start_chatd):
    url = create_database(own_pg_server.url, "chat")
    base = await start_chatd(database_url=url)
    visitor = Visitor(base)
    try:
        socket = await visitor.socket()
        await socket.next("welcome")
        assert (await socket.call("send chat", {"msg": "before"}))["ok"] is True

        await asyncio.to_thread(own_pg_server.stop)
        async with visitor.http.get(base + "/healthz") as response:
            assert response.status == 503
        # The API too: the cookie's revocation check cannot be made, and that is a 503, not a 500.
        async with visitor.http.get(base + "/api/session") as response:
            assert response.status == 503 and (await response.json())["error"] == "unavailable"
            assert response.headers["Retry-After"] == "5"
        answer = await socket.call("send chat", {"msg": "during"})
        assert (answer["ok"], answer["error"]) == (False, "internal_error")
        # A new socket is refused with a reason at once, not left waiting for a CONNECT that never
        # comes: over polling the Socket.IO CONNECT is answered with connect_error...
        polling = RawPollingClient(visitor.http, base, visitor.cookie)
        try:
            await polling.open()
            await polling.send_packet("40")
            answer = await asyncio.wait_for(polling.receive_packets(), 5)
        finally:
            await polling.close()
        assert [p[:2] for p in answer] == ["44"], answer
        assert json.loads(answer[0][2:]) == {"message": "unavailable", "data": {"retry_after": 5}}
        # ...and a websocket upgrade (whose cookie is read before it) is a 503 like any request.
        async with visitor.http.get(
            base + "/socket.io/?EIO=4&transport=websocket",
            headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
        ) as response:
            assert response.status == 503 and (await response.json())["error"] == "unavailable"

        await asyncio.to_thread(own_pg_server.start)
        async with visitor.http.get(base + "/healthz") as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}
        after = await socket.call("send chat", {"msg": "after"})
        assert after["ok"] is True and after["id"] == 2
        history = await socket.call("history", {"room": "general"})
        assert [m["msg"] for m in history["messages"]] == ["before", "after"]
    finally:
        await visitor.close()


async def test_a_handshake_that_fails_midway_is_refused_and_leaves_nobody_online(pg_database_url, start_chatd):
    base = await start_chatd(database_url=pg_database_url)
    observer, failing, later = Visitor(base), Visitor(base), Visitor(base)
    try:
        watcher = await observer.socket()
        await watcher.next("welcome")
        assert (await watcher.call("send chat", {"msg": "hello"}))["ok"] is True  # a welcome now reads history
        await failing.session()
        # The revocation check still works but the history read fails: by then the handshake
        # has put the socket in the room and in presence, which its refusal must undo.
        conn = await asyncpg.connect(pg_database_url)
        try:
            await conn.execute("ALTER TABLE messages RENAME TO messages_away")
            refused = await refusal(base, cookie=failing.cookie)
            assert refused == {"message": "unavailable", "data": {"retry_after": 5}}
            await conn.execute("ALTER TABLE messages_away RENAME TO messages")
        finally:
            await conn.close()
        latecomer = await later.socket()
        welcome = await latecomer.next("welcome")
        assert [m["msg"] for m in welcome["history"]] == ["hello"]
        # Snapshot plus changes, on both sockets: the two sessions that are here, and nobody else,
        # once the window has passed (SPEC: within 1 s) and still after another window.
        both = {watcher.id, latecomer.id}
        for _ in range(30):
            if set(watcher.online["general"]) == set(latecomer.online["general"]) == both:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert set(watcher.online["general"]) == set(latecomer.online["general"]) == both
    finally:
        for visitor in (observer, failing, later):
            await visitor.close()


# -- acceptance: two chatd processes on one PostgreSQL -------------------------------------------


async def test_twenty_writers_in_two_processes_are_seen_in_order_by_a_poller(chatd_process, pg_database_url, tmp_path):
    env = {"CHATD_DATABASE_URL": pg_database_url, "CHATD_SECRET_KEYS": ""}
    processes = [chatd_process("--chat-rate", "0", data_dir=tmp_path / f"d{i}", env=env) for i in range(2)]
    urls = await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))
    visitors = [Visitor(urls[i % 2]) for i in range(21)]
    try:
        sockets = [await v.socket() for v in visitors]
        for s in sockets:
            await s.next("welcome")
        writers, poller = sockets[:20], sockets[20]
        acked: set[int] = set()
        done = asyncio.Event()

        async def write(socket, w: int) -> None:
            for i in range(200):
                answer = await socket.call("send chat", {"msg": f"{w}:{i}"}, timeout=30)
                assert answer["ok"] is True, answer
                acked.add(answer["id"])

        # `after` takes positive ids: the poller's own first message gives it a start.
        assert (await poller.call("send chat", {"msg": "start"}))["id"] == 1

        async def poll() -> list[int]:
            seen: list[int] = [1]
            while not (done.is_set() and acked <= set(seen)):
                page = await poller.call("history", {"room": "general", "after": seen[-1], "limit": 100}, timeout=30)
                for message in page["messages"]:
                    assert not seen or message["id"] > seen[-1], (message["id"], seen[-1])
                    seen.append(message["id"])
                if not page["messages"]:
                    await asyncio.sleep(0.02)
            return seen

        polling = asyncio.create_task(poll())
        await asyncio.gather(*(write(s, w) for w, s in enumerate(writers)))
        done.set()
        seen = await asyncio.wait_for(polling, 60)
        assert len(acked) == 4000
        assert seen == [1, *sorted(acked)] == list(range(1, 4002))
    finally:
        for v in visitors:
            await v.close()
    assert all(p.stop() == 0 for p in processes)


# -- acceptance: copy-data ---------------------------------------------------------------------


def run_copy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatd", "copy-data", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


async def all_pages(storage, room: str, limit: int = 100) -> list[list[dict]]:
    pages, before = [], None
    while page := await storage.history(room, before=before, limit=limit):
        pages.append(page)
        before = page[0]["id"]
    return pages


async def test_copy_data_round_trips_100000_messages_sqlite_postgresql_sqlite(tmp_path, pg_database_url, open_at):
    source_dir, back_dir = tmp_path / "source", tmp_path / "back"
    rooms = ["general", "dev", "random", "x-1"]
    source = await open_at(str(source_dir))
    messages = [(rooms[i % 4], i // 4 + 1, f"u{i % 50}", None if i % 3 else f"u{i % 50}",
                 f"message {i} \x00 😀", 1700000000 + i / 10, i // 4 + 3, None if i % 7 else 1.0 * i,
                 f"a:u{i % 50}", 0, '["User1"]' if i % 7 == 0 else None) for i in range(100_000)]  # fmt: skip
    for start in range(0, len(messages), 20_000):
        await source.load("messages", messages[start : start + 20_000])
    await source.load("room_counters", [(room, 25_000, 25_002) for room in rooms])
    await source.load("accounts", [(f"User{i}", f"user{i}", f"hash{i}", float(i)) for i in range(100)])
    await source.load("revoked_sessions", [(f"sid{i}", 2**40 + i) for i in range(100)])
    await source.load("room_owners", [("a:user1",)])
    await source.load("memberships", [("a:user1", room, 7) for room in rooms])
    await source.load("mentions", [("user1", rooms[i % 4], i // 4 + 1) for i in range(0, 100_000, 7)])
    await source.close()

    to_pg = run_copy("--from", str(source_dir), "--to", pg_database_url)
    assert to_pg.returncode == 0, to_pg.stderr
    assert "copied 100 accounts, 100000 messages, 4 room_counters, 0 client_ids, 100 revoked_sessions, " \
        "1 room_owners, 4 memberships, 14286 mentions" in to_pg.stdout
    assert "messages 100000/100000 (100%)" in to_pg.stderr
    back = run_copy("--from", pg_database_url, "--to", str(back_dir))
    assert back.returncode == 0, back.stderr

    copies = [await open_at(str(source_dir)), await open_at(pg_database_url), await open_at(str(back_dir))]
    for room in rooms:
        pages = [await all_pages(storage, room) for storage in copies]
        assert len(pages[0]) == 250 and pages[0] == pages[1] == pages[2]
        afters = [await storage.history(room, after=24_950) for storage in copies]
        assert afters[0] == afters[1] == afters[2] and len(afters[0]) == 50
    tables = ("accounts", "messages", "room_counters", "revoked_sessions", "room_owners", "memberships", "mentions")
    for table in tables:  # messages: revs, edits, authors, mentions
        dumps = [[row async for batch in s.dump(table) for row in batch] for s in copies]
        assert dumps[0] == dumps[1] == dumps[2]
        sinces = [await storage.history(room, since=25_000) for storage in copies]  # revisions and edits too
        assert sinces[0] == sinces[1] == sinces[2] and len(sinces[0]) == 2
    # Read markers and mentions come along: user1 has unread messages and mentions everywhere.
    states = [await s.room_states("a:user1") for s in copies]
    assert states[0] == states[1] == states[2] and states[0][0]["mentions"] > 0
    # The copies go on counting where the source stopped.
    assert [(await s.add_message("dev", "n", None, "next", 0.0))["id"] for s in copies[1:]] == [25_001, 25_001]
    assert [(await s.add_message("dev", "n", None, "next", 0.0))["rev"] for s in copies[1:]] == [25_004, 25_004]


async def test_copy_data_refuses_a_target_with_data_unless_forced(tmp_path, pg_database_url, open_at):
    source = await open_at(str(tmp_path / "source"))
    await add(source, "r", 3)
    await source.close()
    target = await open_at(pg_database_url)
    await add(target, "other", 1)
    await target.close()

    refused = run_copy("--from", str(tmp_path / "source"), "--to", pg_database_url)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"chatd: {pg_database_url} already holds data (messages, room_counters); use --force to replace it"
    ]
    forced = run_copy("--from", str(tmp_path / "source"), "--to", pg_database_url, "--force")
    assert forced.returncode == 0, forced.stderr
    target = await open_at(pg_database_url)
    assert [m["msg"] for m in await target.history("r")] == ["m0", "m1", "m2"]
    assert await target.history("other") == []


async def test_copy_data_is_refused_while_chatd_holds_the_sqlite_data_dir(tmp_path, pg_database_url, open_at):
    await open_at(str(tmp_path / "busy"))  # this process holds it now
    result = await asyncio.to_thread(run_copy, "--from", str(tmp_path / "busy"), "--to", pg_database_url)
    assert result.returncode == 2 and "in use by another chatd process" in result.stderr


async def test_healthz_is_ok_on_both_backends(backend, start_chatd, place):
    overrides = {"database_url": place} if backend == "postgres" else {"data_dir": Path(place), "database_url": None}
    base = await start_chatd(**overrides)
    async with aiohttp.ClientSession() as http, http.get(base + "/healthz") as response:
        assert response.status == 200
