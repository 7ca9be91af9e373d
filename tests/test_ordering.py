"""chatd.ordering.Sequencer over chatd's real SQLite storage: changes fed in any
order and with repeats (as Redis hands several processes' publications to one
process) come out once each, in rev order; a missing one is fetched from storage
after the hold. Two processes through Redis and nginx: tests/test_cluster_order.py."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from chatd.ordering import Sequencer, change
from chatd.storage.sqlite import SqliteStorage
from conftest import Visitor

HOLD = 0.2


@pytest.fixture
async def storage(tmp_path):
    storage = SqliteStorage(tmp_path / "chatd.sqlite3")
    await storage.open()
    yield storage
    await storage.close()


class Recorder:
    def __init__(self) -> None:
        self.delivered: list[dict] = []
        self.kinds: list[str] = []
        self.times: dict[int, float] = {}
        self.arrived = asyncio.Event()

    async def __call__(self, published: dict) -> None:
        message = published["message"]
        self.kinds.append(published["kind"])
        self.delivered.append(message)
        self.times[message["id"]] = time.monotonic()
        self.arrived.set()

    @property
    def ids(self) -> list[int]:
        return [m["id"] for m in self.delivered]

    async def wait_for(self, count: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.delivered) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), max(0.01, deadline - time.monotonic()))


def new(message: dict) -> dict:
    return change("new", message)


async def store(storage, count: int, room: str = "general") -> list[dict]:
    return [await storage.add_message(room, "alice", None, f"m{i}", time.time(), author="a:alice") for i in range(count)]


async def test_messages_out_of_order_come_out_in_order_without_waiting(storage):
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    assert await sequencer.enter("general", _nothing) == 0
    messages = await store(storage, 4)
    started = time.monotonic()
    for i in (1, 3, 2, 0):
        await sequencer.receive(new(messages[i]))
    assert recorder.ids == [1, 2, 3, 4]
    assert time.monotonic() - started < HOLD  # every gap closed by arrival: no hold, no fetch
    assert recorder.delivered == messages


async def test_duplicates_are_dropped(storage):
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    messages = await store(storage, 3)
    for i in (0, 0, 2, 2, 1, 0, 1, 2):
        await sequencer.receive(new(messages[i]))
    assert recorder.ids == [1, 2, 3]


async def test_a_message_that_never_arrives_is_fetched_from_storage_after_the_hold(storage):
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    messages = await store(storage, 5)
    received = time.monotonic()
    for i in (0, 2, 4):  # 2 and 4 never come by themselves
        await sequencer.receive(new(messages[i]))
    assert recorder.ids == [1]
    await recorder.wait_for(5)
    assert recorder.delivered == messages
    waited = recorder.times[2] - received
    assert HOLD * 0.9 <= waited < HOLD + 1.0, waited
    await sequencer.receive(new(messages[1]))  # the late one, when it comes at last, is a duplicate
    await sequencer.receive(new(messages[3]))
    assert recorder.ids == [1, 2, 3, 4, 5]


async def test_a_room_starts_from_what_storage_holds_when_first_needed(storage):
    old = await store(storage, 5)
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    # A process that has just started: what storage has is history, not news.
    assert await sequencer.enter("general", _nothing) == 5
    fresh = await store(storage, 3)
    for message in (fresh[2], old[2], fresh[0], old[4], fresh[1]):
        await sequencer.receive(new(message))
    assert recorder.ids == [6, 7, 8]
    # A room first seen through a message starts from storage too (no socket here
    # needed the older ones), so the next one is not held.
    other = await store(storage, 2, room="other")
    await sequencer.receive(new(other[1]))
    assert sequencer.watermark("other") == other[1]["id"]
    assert recorder.ids == [6, 7, 8]


async def test_gaps_in_a_rooms_ids_delay_but_never_stall_delivery(storage):
    # Ids with gaps within a room, as in data from before gapless ids, loaded as they are.
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    rows = [("general", 1, "a", None, "one", time.time(), 1, None, None, 0, None),
            ("general", 3, "a", None, "two", time.time(), 3, None, None, 0, None)]  # fmt: skip
    await storage.load("messages", rows)
    first, second = await storage.history("general")
    await sequencer.receive(new(first))
    await sequencer.receive(new(second))  # id 3: held, as 2 might be on its way
    assert recorder.ids == [1]
    await recorder.wait_for(2)
    assert recorder.ids == [1, 3]


async def test_many_messages_from_two_sources_in_any_order_each_come_out_once_in_order(storage):
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    messages = await store(storage, 200)
    # Every message twice (as if published and also fetched), shuffled within windows of 10.
    stream = [m for m in messages for _ in range(2)]
    rng = random.Random(13)
    for start in range(0, len(stream), 20):
        window = stream[start : start + 20]
        rng.shuffle(window)
        stream[start : start + 20] = window
    await asyncio.gather(*(sequencer.receive(new(m)) for m in stream))
    assert recorder.ids == list(range(1, 201))


async def test_a_socket_entering_a_room_gets_history_up_to_the_watermark_and_everything_after(storage):
    """No message in both (duplicate) and none in neither (lost), with deliveries in flight."""
    inside: set[str] = set()
    seen_live: list[int] = []

    async def deliver(published: dict) -> None:
        message = published["message"]
        await asyncio.sleep(0.001)  # a delivery that suspends, as an emit may
        if "late" in inside:
            seen_live.append(message["id"])

    def join() -> None:
        inside.add("late")

    sequencer = Sequencer(storage, deliver, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    messages = await store(storage, 60)
    feeding = asyncio.gather(*(sequencer.receive(new(m)) for m in messages))
    await asyncio.sleep(0)
    watermark = await sequencer.enter("general", join)
    await feeding
    history = [m["id"] for m in await storage.history("general", before=watermark + 1, limit=100)]
    assert sorted(history + seen_live) == list(range(1, 61))
    assert seen_live == sorted(seen_live)


def _nothing() -> None:
    return None


async def test_a_forgotten_room_restarts_from_storage_and_an_unused_check_can_keep_it(storage):
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    await sequencer.forget("general", lambda: False)  # a socket is still in it
    assert sequencer.tracks("general")
    await sequencer.forget("general")
    assert not sequencer.tracks("general") and sequencer.watermark("general") is None
    missed = await store(storage, 3)  # stored while nobody here was in the room
    assert await sequencer.enter("general", _nothing) == 3
    for message in missed:
        await sequencer.receive(new(message))  # late publications: history now, not news
    assert recorder.ids == []


async def test_leaving_a_room_others_are_still_in_does_not_wait_for_a_delivery_under_way(storage):
    """A disconnect from a room still in use has nothing to decide under the room's lock."""
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(published: dict) -> None:  # a delivery that takes a while (thousands of sockets)
        started.set()
        await release.wait()

    sequencer = Sequencer(storage, slow, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    (message,) = await store(storage, 1)
    delivering = asyncio.ensure_future(sequencer.receive(new(message)))
    await asyncio.wait_for(started.wait(), 2)
    await asyncio.wait_for(sequencer.forget("general", lambda: False), 0.5)
    assert sequencer.tracks("general")
    release.set()
    await delivering
    await sequencer.forget("general")  # the last one out: under the lock, once the delivery is done
    assert not sequencer.tracks("general")


async def test_edits_and_deletes_come_out_in_rev_order_with_the_messages(storage):
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    one, two = await store(storage, 2)
    edited = await storage.edit_message("general", 1, "a:alice", "one, again", time.time())
    deleted = await storage.delete_message("general", 2, "a:alice")
    stream = [change("deleted", deleted), change("edited", edited), new(two), new(one), new(two)]
    for published in stream:
        await sequencer.receive(published)
    assert [m["rev"] for m in recorder.delivered] == [1, 2, 3, 4]
    assert recorder.kinds == ["new", "new", "edited", "deleted"]
    assert recorder.delivered[2] == edited and recorder.delivered[3] == deleted


async def test_a_gap_filled_from_storage_brings_each_message_as_it_is_now(storage):
    """Revs 2 (new message 2) and 3 (its edit) and 4 (new 3), 5 (its delete) never arrive: after the
    hold, storage has message 2 at rev 3 — new here, at its latest rev — and 3's deletion."""
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    first, second, third = await store(storage, 3)  # revs 1, 2, 3
    await storage.edit_message("general", 2, "a:alice", "two, again", time.time())  # rev 4
    await storage.delete_message("general", 3, "a:alice")  # rev 5
    last = (await store(storage, 1))[0]  # rev 6
    await sequencer.receive(new(first))
    await sequencer.receive(new(last))
    await recorder.wait_for(4)
    assert recorder.kinds == ["new", "new", "deleted", "new"]
    assert [(m["id"], m["rev"]) for m in recorder.delivered] == [(1, 1), (2, 4), (3, 5), (4, 6)]
    assert recorder.delivered[1]["msg"] == "two, again"
    await sequencer.receive(new(second))  # late publications of superseded revs: dropped
    await sequencer.receive(new(third))
    assert len(recorder.delivered) == 4


async def test_a_gap_is_filled_below_the_first_held_rev_and_later_ones_still_come_as_published(storage):
    """Rev 1 never arrives; message 3 is stored and at once edited (revs 3, 4) while the gap is open.
    The fill takes rev 1 from storage and no further: revs 3 and 4 are still on their way, and taking
    message 3 from storage at rev 4 would make its `new` (rev 3) a duplicate, lost for good."""
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    first, second = await store(storage, 2)  # revs 1, 2
    await sequencer.receive(new(second))
    (third,) = await store(storage, 1)  # rev 3
    edited = await storage.edit_message("general", 3, "a:alice", "three, again", time.time())  # rev 4
    await recorder.wait_for(2)
    await sequencer.receive(new(third))
    await sequencer.receive(change("edited", edited))
    assert [m["rev"] for m in recorder.delivered] == [1, 2, 3, 4]
    assert recorder.kinds == ["new", "new", "new", "edited"]
    assert recorder.delivered[2]["msg"] == "m0" and recorder.delivered[3]["msg"] == "three, again"


async def test_a_later_gap_among_the_held_waits_its_own_hold(storage):
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    messages = await store(storage, 5)
    for i in (0, 2, 4):  # 2 and 4 are late: 2's gap fills after the hold, 4's is a new hold after that
        await sequencer.receive(new(messages[i]))
    await recorder.wait_for(3)
    assert recorder.ids == [1, 2, 3]
    await asyncio.sleep(HOLD / 2)
    assert recorder.ids == [1, 2, 3]
    await sequencer.receive(new(messages[3]))  # 4 comes inside its own hold: as published, no fetch
    assert recorder.ids == [1, 2, 3, 4, 5]


async def passed_over_after_a_fill(storage) -> tuple[Recorder, Sequencer, dict, dict]:
    """Messages 1-3 stored (revs 1-3), message 2 edited (rev 4); only 1 and 3 arrive, and the
    fill passes message 2 over. The recorder (1 and 3 delivered), the sequencer, message 2 as
    created, and its edit still to come."""
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    first, second, third = await store(storage, 3)
    edited = await storage.edit_message("general", 2, "a:alice", "two, again", time.time())
    await sequencer.receive(new(first))
    await sequencer.receive(new(third))
    await recorder.wait_for(2)
    return recorder, sequencer, second, edited


async def test_an_edit_of_a_message_whose_new_was_passed_over_comes_as_new(storage):
    """Message 2 is created (rev 2) and edited (rev 4) while rev 2's publication is lost; rev 3 is held.
    Storage no longer has rev 2, so the fill passes over it; the edit, when it comes, is the first this
    process sees of message 2, and goes out as `new`."""
    recorder, sequencer, second, edited = await passed_over_after_a_fill(storage)
    assert [(m["id"], m["rev"]) for m in recorder.delivered] == [(1, 1), (3, 3)]
    await sequencer.receive(change("edited", edited))
    assert [(m["id"], m["rev"]) for m in recorder.delivered] == [(1, 1), (3, 3), (2, 4)]
    assert recorder.kinds == ["new", "new", "new"]
    await sequencer.receive(new(second))  # its late `new`, at a rev long passed: a duplicate
    assert len(recorder.delivered) == 3


async def test_a_message_edited_inside_a_gap_comes_as_new_though_a_later_one_came_first(storage):
    """Revs 2 (new message 2), 3 (new message 3), 4 (message 2 edited) never arrive; rev 5 does.
    Storage has message 3 at rev 3 and message 2 at rev 4, so the fill delivers 3 first; message 2,
    never delivered here, must still come as `new` (found by the random test below)."""
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=HOLD)
    await sequencer.enter("general", _nothing)
    first, _, _ = await store(storage, 3)  # revs 1, 2, 3
    await storage.edit_message("general", 2, "a:alice", "two, again", time.time())  # rev 4
    (last,) = await store(storage, 1)  # rev 5
    await sequencer.receive(new(first))
    await sequencer.receive(new(last))
    await recorder.wait_for(4)
    assert [(m["id"], m["rev"]) for m in recorder.delivered] == [(1, 1), (3, 3), (2, 4), (4, 5)]
    assert recorder.kinds == ["new", "new", "new", "new"]


@pytest.mark.parametrize("seed", range(8))
async def test_random_changes_late_or_lost_leave_every_socket_with_what_storage_has(storage, seed):
    """Messages sent, edited and deleted at random; each change's publication comes late (up to
    twice the hold) or never; the last one always comes. Whatever the interleaving: revs come out
    once each and increasing, no message is `edited` before it came as `new` nor `new` twice, and
    a client applying what came ends with the room as storage has it."""
    hold = 0.05
    rng = random.Random(seed)
    recorder = Recorder()
    sequencer = Sequencer(storage, recorder, hold_seconds=hold)
    await sequencer.enter("general", _nothing)
    live: list[int] = []
    arrivals = []

    def publish(published: dict, *, lost: float = 0.15) -> None:
        if rng.random() >= lost:
            delay = rng.uniform(0, 2 * hold)
            arrivals.append(asyncio.ensure_future(_later(delay, sequencer.receive(published))))

    for step in range(80):
        roll = rng.random()
        if live and roll < 0.3:
            id_ = rng.choice(live)
            publish(change("edited", await storage.edit_message("general", id_, "a:alice", f"e{step}", time.time())))
        elif live and roll < 0.4:
            id_ = live.pop(rng.randrange(len(live)))
            publish(change("deleted", await storage.delete_message("general", id_, "a:alice")))
        else:
            (message,) = await store(storage, 1)
            live.append(message["id"])
            publish(new(message))
        if rng.random() < 0.3:
            await asyncio.sleep(rng.uniform(0, hold))
    (last,) = await store(storage, 1)
    publish(new(last), lost=0)
    await asyncio.gather(*arrivals)
    deadline = time.monotonic() + 5
    while recorder.delivered[-1:] != [last] and time.monotonic() < deadline:
        await asyncio.sleep(hold)

    revs = [m["rev"] for m in recorder.delivered]
    assert revs == sorted(set(revs)) and revs[-1] == last["rev"], revs
    shown: dict[int, str] = {}
    for kind, message in zip(recorder.kinds, recorder.delivered):
        if kind == "new":
            assert message["id"] not in shown, ("new twice", message)
            shown[message["id"]] = message["msg"]
        elif kind == "edited":
            assert message["id"] in shown, ("edited before new", message)
            shown[message["id"]] = message["msg"]
        else:
            shown.pop(message["id"], None)  # a deletion of one never shown: nothing to remove
    stored = {m["id"]: m["msg"] for m in await storage.history("general", limit=100)}
    assert shown == stored


async def _later(delay: float, receiving) -> None:
    await asyncio.sleep(delay)
    await receiving


async def test_a_message_passed_over_is_left_out_of_a_joiners_history_until_it_comes(storage):
    """Message 2 (rev 2) is edited (rev 4) and both publications are late: after the fill, a
    socket that enters gets history up to the watermark (message 3) less message 2, which comes
    live as `new` when its edit arrives; so nobody gets it twice, nor misses it."""
    recorder, sequencer, _, edited = await passed_over_after_a_fill(storage)
    assert await sequencer.enter("general", _nothing) == 3
    assert sequencer.passed_over("general") == {2}
    await sequencer.receive(change("edited", edited))
    assert recorder.kinds[-1] == "new" and recorder.delivered[-1]["id"] == 2
    assert sequencer.passed_over("general") == frozenset()


async def test_a_socket_joining_after_a_gap_passed_a_message_over_gets_it_once(aiohttp_server, make_config):
    """chatd in this process. Message 1 is stored and its publication lost (its process died),
    message 2 is sent, message 1 is edited and that publication comes late. After the hold the
    room goes on from message 2; a socket joining then has message 2 in its history but not 1,
    and both sockets get message 1 once, live, as `new chat` when the edit arrives."""
    from chatd.keys import REALTIME, STORAGE
    from chatd.web import create_app

    app = create_app(make_config())
    server = await aiohttp_server(app)
    url = str(server.make_url("/")).rstrip("/")
    rooms, storage = app[REALTIME].rooms, app[STORAGE]
    first, second = Visitor(url), Visitor(url)
    try:
        early = await first.socket()
        await early.next("welcome")
        assert (await early.call("join", {"room": "gaps"}))["ok"] is True
        lost = await storage.add_message("gaps", "ghost", None, "never published", time.time(), author="g:ghost")
        ack = await early.call("send chat", {"room": "gaps", "msg": "the next one"})
        edited = await storage.edit_message("gaps", lost["id"], "g:ghost", "edited, late", time.time())
        assert (await early.next("new chat"))["id"] == ack["id"]  # after the hold
        late = await second.socket()
        await late.next("welcome")
        joined = await late.call("join", {"room": "gaps"})
        assert [m["id"] for m in joined["history"]] == [ack["id"]]
        await rooms.publish_change("edited", edited)  # the late publication
        for socket in (early, late):
            message = await socket.next("new chat")
            assert (message["id"], message["msg"], message["rev"]) == (lost["id"], "edited, late", edited["rev"])
            await socket.nothing("new chat", wait=0.1)
            await socket.nothing("chat edited", wait=0)
    finally:
        await first.close()
        await second.close()
