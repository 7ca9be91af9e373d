"""Messages people can fix (issue 21): revisions per room, `client_id`, `edit chat`,
`delete chat`, `history` `since`, and erasure — over real chatds and real sockets.

The in-process chatd stores in SQLite, or in PostgreSQL under
CHATD_TEST_BACKEND=postgres; the storage-level tests at the end run on both
backends either way (two PostgreSQL storages on one database stand for two
processes)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from chatd.storage import CLIENT_ID_SECONDS, TABLES, ChangeRefused
from chatd.storage.copy import open_storage
from conftest import TEST_BACKEND, Visitor
from test_storage import backend, open_at, place, storage  # noqa: F401 (fixtures, both backends)

pytestmark = pytest.mark.storage


async def joined(visitor, room: str = "general"):
    """A connected socket of `visitor`, welcomed, in `room`."""
    socket = await visitor.socket()
    await socket.next("welcome")
    if room != "general":
        assert (await socket.call("join", {"room": room}))["ok"] is True
    return socket


async def send(socket, msg: str, room: str = "general", **extra) -> dict:
    ack = await socket.call("send chat", {"room": room, "msg": msg, **extra})
    assert ack["ok"] is True, ack
    return ack


async def latest(socket, room: str = "general", **query) -> dict:
    answer = await socket.call("history", {"room": room, **query})
    assert answer["ok"] is True, answer
    return answer


def error(answer: dict) -> str:
    assert answer["ok"] is False, answer
    return answer["error"]


# -- revisions ---------------------------------------------------------------------------


async def test_every_new_edited_and_deleted_message_takes_the_rooms_next_rev(visitors):
    alice = await joined(await visitors())
    bob = await joined(await visitors())
    first = await send(alice, "one")
    second = await send(alice, "two")
    assert (first["id"], first["rev"], second["id"], second["rev"]) == (1, 1, 2, 2)
    assert error(await bob.call("edit chat", {"room": "general", "id": 1, "msg": "not mine"})) == "forbidden"
    edited = await alice.call("edit chat", {"room": "general", "id": 1, "msg": "one, fixed"})
    assert edited == {"ok": True, "rev": 3}  # the refused edit took no rev
    assert await alice.call("delete chat", {"room": "general", "id": 2}) == {"ok": True, "rev": 4}
    assert error(await alice.call("delete chat", {"room": "general", "id": 2})) == "not_found"
    third = await send(alice, "three")
    assert (third["id"], third["rev"]) == (3, 5)
    # Another room counts its own revisions from 1.
    await alice.call("join", {"room": "side"})
    assert (await send(alice, "side one", room="side"))["rev"] == 1

    history = await latest(bob)
    assert history["rev"] == 5
    [one, three] = history["messages"]  # the deleted one is left out
    assert (one["id"], one["msg"], one["rev"], one["ts"] < one["edited"]) == (1, "one, fixed", 3, True)
    assert (three["id"], three["rev"], three["edited"]) == (3, 5, None)
    # Bob saw every change live, in rev order.
    assert [m["rev"] for m in bob.drain("new chat")] == [1, 2, 5]
    assert bob.drain("chat edited") == [one]
    assert bob.drain("chat deleted") == [{"room": "general", "id": 2, "rev": 4}]


# -- client_id ----------------------------------------------------------------------------


async def test_a_repeated_client_id_acks_as_the_first_and_stores_and_broadcasts_nothing(visitors):
    alice_visitor = await visitors()
    alice, other_tab = await joined(alice_visitor), await joined(alice_visitor)
    bob = await joined(await visitors())
    first = await send(alice, "hello", client_id="c-1")
    await bob.next("new chat")
    again = await other_tab.call("send chat", {"room": "general", "msg": "whatever else", "client_id": "c-1"})
    assert again == first  # same session, another socket: the first send's ack
    await bob.nothing("new chat")
    assert [m["msg"] for m in (await latest(bob))["messages"]] == ["hello"]
    # Another client_id, another session with the same client_id, another room: new messages.
    assert (await send(alice, "hello", client_id="c-2"))["id"] == 2
    assert (await send(bob, "hello", client_id="c-1"))["id"] == 3
    await alice.call("join", {"room": "side"})
    assert (await send(alice, "hello", room="side", client_id="c-1"))["id"] == 1
    # Without a client_id, nothing is deduplicated.
    assert (await send(alice, "hello"))["id"] == 4 and (await send(alice, "hello"))["id"] == 5


async def test_a_resend_after_a_lost_ack_is_answered_without_a_second_message(visitors):
    """As the page's outbox does: the first send's ack never reached the client (here: it asked
    for none), so it sends again with the same client_id, from a new connection."""
    alice_visitor = await visitors()
    alice = await joined(alice_visitor)
    bob = await joined(await visitors())
    await alice.emit("send chat", {"msg": "did it go?", "client_id": "outbox-1"})
    first = await bob.next("new chat")
    await alice.close()
    again = await joined(alice_visitor)  # reconnected
    ack = await again.call("send chat", {"msg": "did it go?", "client_id": "outbox-1"})
    assert ack == {"ok": True, "id": first["id"], "rev": first["rev"]}
    await bob.nothing("new chat")


async def test_an_account_shares_its_client_ids_across_its_sessions(visitors):
    laptop, phone = await visitors(), await visitors()
    await laptop.register("carol")
    assert (await phone.post("/api/login", {"username": "carol", "password": "correct horse"}))[0] == 200
    on_laptop, on_phone = await joined(laptop), await joined(phone)
    first = await send(on_laptop, "from the laptop", client_id="x")
    assert await on_phone.call("send chat", {"msg": "from the phone", "client_id": "x"}) == first
    # And the account may edit it from the other session.
    assert (await on_phone.call("edit chat", {"room": "general", "id": first["id"], "msg": "fixed"}))["ok"] is True


@pytest.mark.parametrize(
    "client_id", ["", "x" * 65, "has space", "dot.", "é", "new\nline", 7, True, ["a"], {"a": 1}]
)
async def test_a_malformed_client_id_is_invalid_request(visitors, client_id):
    alice = await joined(await visitors())
    assert error(await alice.call("send chat", {"msg": "hi", "client_id": client_id})) == "invalid_request"
    assert (await send(alice, "hi", client_id="A-z_09" + "x" * 58))["id"] == 1  # 64 of the allowed characters


async def test_client_ids_within_one_group_commit_and_across_batches_make_one_message_each(storage):  # noqa: F811
    # Sent at once, the 30 sends share a transaction (group commit): 3 keys, 10 sends each.
    answers = await asyncio.gather(
        *(storage.add_message("r", "n", None, f"m{i}", time.time(), author="s:x", client_id=f"k{i % 3}") for i in range(30))
    )
    firsts = {a["id"]: a for a in answers if not a.get("duplicate")}
    assert sorted(firsts) == [1, 2, 3]
    for i, answer in enumerate(answers):
        assert answer["id"] == answers[i % 3]["id"] and answer["rev"] == answers[i % 3]["rev"]
    # A later batch finds the kept keys.
    later = await storage.add_message("r", "n", None, "later", time.time(), author="s:x", client_id="k1")
    assert later == {"room": "r", "id": answers[1]["id"], "rev": answers[1]["rev"], "duplicate": True}
    assert await storage.count("messages") == 3 and await storage.count("client_ids") == 3
    # No author (nobody to scope it to): the client_id is not kept.
    await storage.add_message("r", "n", None, "x", time.time(), client_id="k1")
    assert await storage.count("messages") == 4


async def test_a_client_id_older_than_a_day_is_new_again_and_pruned_in_the_background(storage):  # noqa: F811
    old = time.time() - CLIENT_ID_SECONDS - 5
    await storage.load("client_ids", [("s:x", "r", "old", 41, 41, old), ("s:x", "r", "kept", 42, 42, time.time())])
    fresh = await storage.add_message("r", "n", None, "m", time.time(), author="s:x", client_id="old")
    assert "duplicate" not in fresh and fresh["id"] == 1  # the expired key was taken over
    again = await storage.add_message("r", "n", None, "m", time.time(), author="s:x", client_id="old")
    assert again["id"] == 1 and again["duplicate"] is True
    await storage.load("client_ids", [("s:y", "r", "stale", 1, 1, old)])
    assert await storage.prune_client_ids(time.time() - CLIENT_ID_SECONDS) == 1
    assert sorted([r[2] async for batch in storage.dump("client_ids") for r in batch]) == ["kept", "old"]


async def test_expired_client_ids_are_removed_by_a_running_chatd(start_chatd, make_config):
    config = make_config()
    storage = open_storage(config.database_url or str(config.data_dir))
    await storage.open()
    try:
        await storage.load("client_ids", [("s:y", "r", "stale", 1, 1, 0.0), ("s:y", "r", "kept", 2, 2, time.time())])
        await start_chatd()  # its housekeeping task removes expired keys at once, then every 10 minutes
        for _ in range(50):
            if await storage.count("client_ids") == 1:
                break
            await asyncio.sleep(0.05)
        assert [r[2] async for batch in storage.dump("client_ids") for r in batch] == ["kept"]
    finally:
        await storage.close()


@pytest.mark.skipif(TEST_BACKEND != "postgres", reason="two processes share PostgreSQL (SQLite: one process a data dir)")
async def test_two_duplicates_at_once_on_two_processes_make_one_message(start_chatd, visitors):
    a_url, b_url = await start_chatd(chat_rate=0), await start_chatd(chat_rate=0)
    on_a = await visitors(a_url)
    socket_a = await joined(on_a)
    on_b = await visitors(b_url)
    on_b.http.cookie_jar.update_cookies({"chatd_session": on_a.cookie})  # one guest session on both
    socket_b = await joined(on_b)
    pairs = await asyncio.gather(
        *(
            asyncio.gather(
                socket_a.call("send chat", {"msg": f"a{i}", "client_id": f"k{i}"}),
                socket_b.call("send chat", {"msg": f"b{i}", "client_id": f"k{i}"}),
            )
            for i in range(40)
        )
    )
    for first, second in pairs:
        assert first["ok"] is True and first == second
    history = (await latest(socket_a, limit=100))["messages"]
    assert len(history) == 40 and sorted(m["id"] for m in history) == list(range(1, 41))


async def test_two_storages_on_one_database_store_a_duplicate_pair_once(backend, place, open_at):  # noqa: F811
    if backend != "postgres":
        pytest.skip("one SQLite data dir serves one process")
    one, two = await open_at(place), await open_at(place)
    answers = await asyncio.gather(
        *(
            s.add_message("r", "n", None, f"m{i}", time.time(), author="a:bob", client_id=f"k{i // 2}")
            for i, s in enumerate([one, two] * 50)
        )
    )
    for i in range(0, 100, 2):
        assert (answers[i]["id"], answers[i]["rev"]) == (answers[i + 1]["id"], answers[i + 1]["rev"])
        assert sum(1 for a in answers[i : i + 2] if a.get("duplicate")) == 1
    assert await one.count("messages") == 50


# -- edit and delete: permissions and errors -------------------------------------------------


async def test_edit_and_delete_errors(visitors):
    alice_visitor = await visitors()
    alice, alice_tab = await joined(alice_visitor), await joined(alice_visitor)
    bob = await joined(await visitors())
    mine = (await send(alice, "mine"))["id"]
    cases = [
        ({"room": "general", "id": mine}, "invalid_request"),  # edit without msg
        ({"room": "general", "id": "1", "msg": "x"}, "invalid_request"),
        ({"room": "general", "id": True, "msg": "x"}, "invalid_request"),
        ({"room": "general", "id": 1.5, "msg": "x"}, "invalid_request"),
        ({"id": mine, "msg": "x"}, "invalid_request"),
        ("not an object", "invalid_request"),
        ({"room": "Nope", "id": mine, "msg": "x"}, "invalid_room"),
        ({"room": "general", "id": mine, "msg": "   "}, "invalid_message"),
        ({"room": "general", "id": mine, "msg": "x" * 2001}, "invalid_message"),
        ({"room": "elsewhere", "id": mine, "msg": "x"}, "not_in_room"),
        ({"room": "general", "id": 99, "msg": "x"}, "not_found"),
        ({"room": "general", "id": 0, "msg": "x"}, "not_found"),
        ({"room": "general", "id": -3, "msg": "x"}, "not_found"),
        ({"room": "general", "id": 2**70, "msg": "x"}, "not_found"),
    ]
    for payload, code in cases:
        assert error(await alice.call("edit chat", payload)) == code, payload
    for payload, code in [
        ({"room": "general"}, "invalid_request"),
        ({"room": "general", "id": None}, "invalid_request"),
        ({"room": "elsewhere", "id": mine}, "not_in_room"),
        ({"room": "general", "id": 99}, "not_found"),
        ({"room": "general", "id": 2**70}, "not_found"),
    ]:
        assert error(await alice.call("delete chat", payload)) == code, payload
    # Only the author: another guest may neither edit nor delete; the same session may, from any socket.
    assert error(await bob.call("edit chat", {"room": "general", "id": mine, "msg": "bob's"})) == "forbidden"
    assert error(await bob.call("delete chat", {"room": "general", "id": mine})) == "forbidden"
    assert (await alice_tab.call("edit chat", {"room": "general", "id": mine, "msg": "  fixed  "}))["ok"] is True
    assert [m["msg"] for m in (await latest(bob))["messages"]] == ["fixed"]  # trimmed as a send is
    # A message in another room is not found by its id here.
    await alice.call("join", {"room": "side"})
    side = (await send(alice, "side", room="side"))["id"]
    await send(alice, "another")
    assert error(await alice.call("delete chat", {"room": "general", "id": side + 5})) == "not_found"
    assert (await alice_tab.call("delete chat", {"room": "general", "id": mine}))["ok"] is True
    assert error(await alice.call("edit chat", {"room": "general", "id": mine, "msg": "back"})) == "not_found"
    # Without an ack, the error comes as chat_error.
    await bob.emit("edit chat", {"room": "general", "id": 2, "msg": "x"})
    assert await bob.next("chat_error") == {
        "event": "edit chat", "error": "forbidden", "message": "Only its author may change this message."
    }  # fmt: skip


async def test_edit_chat_draws_on_the_chat_rate_limit(start_chatd, visitors):
    url = await start_chatd(chat_burst=2, chat_rate=0.01)
    alice = await joined(await visitors(url))
    mine = (await send(alice, "one"))["id"]
    assert (await alice.call("edit chat", {"room": "general", "id": mine, "msg": "two"}))["ok"] is True
    refused = await alice.call("edit chat", {"room": "general", "id": mine, "msg": "three"})
    assert error(refused) == "rate_limited" and refused["retry_after"] > 0
    assert (await alice.call("delete chat", {"room": "general", "id": mine}))["ok"] is True  # deletes do not


# -- deleted messages vanish, and since catches up ----------------------------------------------


async def test_deleted_messages_vanish_from_welcome_join_and_history(visitors):
    alice_visitor = await visitors()
    alice = await joined(alice_visitor)
    ids = [(await send(alice, f"m{i}"))["id"] for i in range(6)]
    for id_ in (ids[0], ids[3], ids[5]):
        assert (await alice.call("delete chat", {"room": "general", "id": id_}))["ok"] is True
    kept = ["m1", "m2", "m4"]
    newcomer = await (await visitors()).socket()
    assert [m["msg"] for m in (await newcomer.next("welcome"))["history"]] == kept
    assert [m["msg"] for m in (await latest(alice))["messages"]] == kept
    assert [m["msg"] for m in (await latest(alice, before=5))["messages"]] == ["m1", "m2"]
    assert [m["msg"] for m in (await latest(alice, after=1))["messages"]] == kept
    assert [m["msg"] for m in (await latest(alice, limit=2))["messages"]] == ["m2", "m4"]
    await alice.call("join", {"room": "side"})
    await send(alice, "gone", room="side")
    await alice.call("delete chat", {"room": "side", "id": 1})
    other = await joined(await visitors())
    assert (await other.call("join", {"room": "side"}))["history"] == []


async def test_history_since_replayed_from_a_kept_state_ends_equal_to_a_fresh_history(visitors):
    alice = await joined(await visitors())
    bob = await joined(await visitors())
    for i in range(8):
        await send(alice, f"m{i}")
    kept = {m["id"]: m for m in (await latest(bob))["messages"]}  # what a client holds
    seen = max(m["rev"] for m in kept.values())
    # While it was away: sends, edits (one twice), deletes (one of an edited message, one of a new one).
    for i in range(8, 12):
        await send(alice, f"m{i}")
    for id_, text in [(2, "two"), (3, "three"), (2, "two, again"), (10, "ten"), (5, "five")]:
        assert (await alice.call("edit chat", {"room": "general", "id": id_, "msg": text}))["ok"] is True
    for id_ in (3, 1, 11):
        assert (await alice.call("delete chat", {"room": "general", "id": id_}))["ok"] is True
    await send(alice, "last")
    # Replay, as SPEC says: pages of `limit` since the highest rev seen.
    since, pages = seen, []
    while True:
        page = await latest(bob, since=since, limit=3)
        pages.append(page)
        for change in page["messages"]:
            if change.get("deleted"):
                assert set(change) == {"room", "id", "rev", "deleted"}
                kept.pop(change["id"], None)
            else:
                kept[change["id"]] = change
        revs = [c["rev"] for c in page["messages"]]
        assert revs == sorted(revs) and all(r > since for r in revs)
        if len(page["messages"]) < 3:
            break
        since = revs[-1]
    fresh = await latest(bob, limit=100)
    assert [kept[i] for i in sorted(kept)] == fresh["messages"]
    assert pages[-1]["rev"] == fresh["rev"] == 8 + 4 + 5 + 3 + 1
    # Message 2 was edited twice: it comes once, as it is now.
    changes = [c for p in pages for c in p["messages"]]
    assert [c["id"] for c in changes].count(2) == 1
    assert (await latest(bob, since=fresh["rev"]))["messages"] == []
    assert (await latest(bob, since=2**80))["messages"] == []


@pytest.mark.parametrize(
    "query",
    [{"since": -1}, {"since": 1, "before": 5}, {"since": 0, "after": 1}, {"since": "1"}, {"since": 1.0}, {"since": 0, "limit": 0}],
)
async def test_history_since_errors(visitors, query):
    alice = await joined(await visitors())
    assert error(await alice.call("history", {"room": "general", **query})) == "invalid_request"


# -- erasure -------------------------------------------------------------------------------


async def test_a_deleted_message_and_its_earlier_versions_are_in_no_table_nor_file(start_chatd, make_config, visitors):
    config = make_config()
    url = await start_chatd()
    alice = await joined(await visitors(url))
    secrets = ["first-version-7f3a9c", "second-version-b81e2d"]
    mine = (await send(alice, secrets[0]))["id"]
    await send(alice, "an innocent neighbour")
    assert (await alice.call("edit chat", {"room": "general", "id": mine, "msg": secrets[1]}))["ok"] is True
    for i in range(5):  # more traffic around it
        await send(alice, f"filler {i} " * 50)
    assert (await alice.call("delete chat", {"room": "general", "id": mine}))["ok"] is True
    # Every row of every table, as storage holds it.
    storage = open_storage(config.database_url or str(config.data_dir))
    await storage.open()
    try:
        everything = []
        for table in TABLES:
            everything += [row async for batch in storage.dump(table) for row in batch]
    finally:
        await storage.close()
    text = repr(everything)
    assert "an innocent neighbour" in text  # the check can see a message
    for secret in secrets:
        assert secret not in text
    if config.database_url is None:  # and the SQLite files' bytes: database, WAL, shared memory
        files = [p for p in config.data_dir.iterdir() if p.name.startswith("chatd.sqlite3")]
        assert any(p.name.endswith("-wal") for p in files) or files
        for path in files:
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, path.name


# -- durability ----------------------------------------------------------------------------


async def test_acked_edits_and_deletes_survive_kill_9(chatd_process):
    """SPEC: acked means on disk. 60 messages, then 40 edits and 20 deletes sent at once,
    SIGKILL (no shutdown) the moment the last ack is in: every acked change is stored."""
    process = chatd_process("--chat-rate", "0")
    visitor = Visitor(process.start())
    socket = await joined(visitor)
    ids = [r["id"] for r in await asyncio.gather(*(send(socket, f"m{i}") for i in range(60)))]
    edits = {id_: f"edited {id_}" for id_ in ids if id_ % 3 != 0}
    deletes = [id_ for id_ in ids if id_ % 3 == 0]
    acks = await asyncio.gather(
        *(socket.call("edit chat", {"room": "general", "id": id_, "msg": text}) for id_, text in edits.items()),
        *(socket.call("delete chat", {"room": "general", "id": id_}) for id_ in deletes),
    )
    process.stop(signal.SIGKILL)
    await visitor.close()
    assert all(a["ok"] for a in acks), acks
    acked_revs = sorted(a["rev"] for a in acks)

    again = Visitor(chatd_process("--chat-rate", "0").start())
    socket = await joined(again)
    changes, since = [], 0
    while page := (await latest(socket, since=since, limit=100))["messages"]:
        changes += page
        since = page[-1]["rev"]
    await again.close()
    assert sorted(c["rev"] for c in changes) == acked_revs  # every message was changed after it was sent
    assert {c["id"]: c["msg"] for c in changes if not c.get("deleted")} == edits
    assert sorted(c["id"] for c in changes if c.get("deleted")) == deletes


# -- migration ------------------------------------------------------------------------------


async def test_messages_from_before_revisions_take_their_id_as_rev(backend, place, open_at):  # noqa: F811
    """The schema just before revisions, with messages in it: after the migration each message's
    rev is its id, each room's revision its last id, and an account's old messages are its own."""
    rows = [("a", 1, "amy", "Amy", "from amy"), ("a", 3, "guest-1", None, "from a guest"), ("b", 2, "n", None, "b")]
    if backend == "sqlite":
        import sqlite3
        from pathlib import Path

        from chatd.config import DATABASE_FILE_NAME
        from chatd.storage.sqlite import MIGRATIONS

        Path(place).mkdir(parents=True)
        db = sqlite3.connect(Path(place) / DATABASE_FILE_NAME)
        for statement in [s for migration in MIGRATIONS[:2] for s in migration]:
            db.execute(statement)
        db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, 1.0)", rows)
        db.executemany("INSERT INTO room_counters VALUES (?, ?)", [("a", 3), ("b", 2)])
        db.execute("PRAGMA user_version = 2")
        db.commit()
        db.close()
    else:
        import asyncpg

        from chatd.storage.postgres import MIGRATIONS

        conn = await asyncpg.connect(place)
        try:
            for statement in MIGRATIONS[0]:
                await conn.execute(statement)
            await conn.execute("CREATE TABLE chatd_schema (version integer NOT NULL)")
            await conn.execute("INSERT INTO chatd_schema VALUES (1)")
            await conn.executemany(
                "INSERT INTO messages VALUES ($1, $2, $3, $4, $5, 1.0)", [(*r[:4], r[4].encode()) for r in rows]
            )
            await conn.executemany("INSERT INTO room_counters VALUES ($1, $2)", [("a", 3), ("b", 2)])
        finally:
            await conn.close()
    storage = await open_at(place)
    assert [(m["id"], m["rev"], m["edited"]) for m in await storage.history("a", since=0)] == [(1, 1, None), (3, 3, None)]
    assert await storage.revision("a") == (3, 3)
    with pytest.raises(ChangeRefused):
        await storage.edit_message("a", 1, "a:Bob", "not bob's", 2.0)
    assert (await storage.edit_message("a", 1, "a:amy", "amy again", 2.0))["rev"] == 4  # storage.owner_key
    with pytest.raises(ChangeRefused):
        await storage.delete_message("a", 3, "s:anyone")  # an old guest message is nobody's to change
    new = await storage.add_message("b", "n", None, "next", 2.0)
    assert (new["id"], new["rev"]) == (3, 3)
