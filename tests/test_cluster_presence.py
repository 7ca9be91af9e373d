"""Presence across processes (issue 13, acceptance 4): two `python -m chatd` processes on one
throwaway Redis and one throwaway PostgreSQL database, nginx in front.

A client's view of a room is its snapshot (`welcome` or a `join` ack) with every `presence`
event applied as SPEC says (conftest.SocketClient keeps it); the truth is who has a socket in
the room, on either process. Missing redis-server, nginx or PostgreSQL: a loud skip, or a
failure under CI=true.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import aiohttp
import pytest

from chatd.presence.redis import ALIVE_SECONDS, CHANNEL, HEARTBEAT_SECONDS, PREFIX
from conftest import ChatdProcess, SocketClient, Visitor, apply_presence, by_name, connect_socket
from cluster_service import Cluster, running_cluster, visitors  # noqa: F401 (fixture)
from redis_service import redis_service, start_redis  # noqa: F401 (fixture)

pytestmark = pytest.mark.cluster

HEARD_WITHIN = 1.0  # SPEC: a room's change reaches every socket within 1 s, on every process
DEAD_GONE_WITHIN = 15.0  # SPEC: a killed process's sessions leave within 15 s

FLAGS = ("--metrics", "--chat-rate", "0")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_server):
    with running_cluster(tmp_path_factory.mktemp("presence-cluster"), pg_server[0], *FLAGS) as made:
        yield made


@pytest.fixture
def fresh_cluster(tmp_path, pg_server):
    """A cluster of its own, for a test that stops one of its processes."""
    with running_cluster(tmp_path, pg_server[0], *FLAGS) as made:
        yield made


async def tab(visitors, url: str, cookie_from: Visitor | None = None, transport: str = "websocket") -> SocketClient:
    """A socket on `url`: of a new guest, or one more tab of `cookie_from`'s session."""
    if cookie_from is None:
        visitor = await visitors(url)
        socket = await visitor.socket(transport=transport)
    else:
        socket = await connect_socket(url, cookie=cookie_from.cookie, transport=transport)
        cookie_from.sockets.append(socket)
    socket.welcome = await socket.next("welcome")
    return socket


async def all_see(sockets, expected, room: str = "general", timeout: float = 3.0) -> float:
    """Wait until every socket's view of `room` is `expected`; the seconds it took."""
    started = time.monotonic()
    await asyncio.gather(*(socket.sees(room, expected, timeout=timeout) for socket in sockets))
    return time.monotonic() - started


def presence_events(socket: SocketClient, room: str = "general") -> list[dict]:
    """The presence events of `room` this socket got so far (left in its queue)."""
    events = socket.drain("presence")
    for event in events:
        socket.queues["presence"].put_nowait(event)
    return [event for event in events if event["room"] == room]


def leaves_of(socket: SocketClient, member_id: str, room: str = "general") -> list[dict]:
    """The presence events this socket got that remove `member_id`."""
    return [e for e in presence_events(socket, room) if any(m["id"] == member_id for m in e["leaves"])]


async def redis_members(cluster: Cluster, room: str) -> dict[str, int]:
    """Redis's record of a room: member id -> how many processes hold it."""
    from redis.asyncio import Redis

    redis = Redis.from_url(cluster.redis.url)
    try:
        # One transaction: both read at the same moment, never across a script of chatd's.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(f"{PREFIX}room:{room}:holders")
            pipe.hkeys(f"{PREFIX}room:{room}:members")
            holders, members = await pipe.execute()
    finally:
        await redis.aclose()
    assert sorted(holders) == sorted(members)
    return {key.decode(): int(value) for key, value in holders.items()}


async def published_on(pubsub, wait: float) -> list[tuple[str, str]]:
    """(channel, message) of everything published on the subscribed channels for `wait` seconds."""
    published = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            published.append((message["channel"].decode(), message["data"].decode()))
    return published


# -- snapshots and changes agree on both processes ------------------------------------------


async def test_snapshots_and_changes_agree_on_both_processes(cluster, visitors):
    a, b = cluster.a.url, cluster.b.url
    on_a, on_b = await tab(visitors, a), await tab(visitors, b)
    observers = [on_a, on_b]
    alice_visitor = await visitors(a)
    alice_a = await alice_visitor.socket()
    await alice_a.next("welcome")
    alice_b = await tab(visitors, b, cookie_from=alice_visitor, transport="polling")
    assert alice_a.me == alice_b.me  # one session, one member id, on both processes
    bob = await tab(visitors, b)
    everyone = [on_a, on_b, alice_a, bob]
    truth = [on_a.me, on_b.me, alice_a.me, bob.me]
    await all_see(everyone + [alice_b], truth)

    # A newcomer on each process: heard on the other within 1 s, and its snapshot is the truth.
    for here, there in ((a, on_b), (b, on_a)):
        started = time.monotonic()
        newcomer = await tab(visitors, here)
        await there.sees("general", truth + [newcomer.me], timeout=HEARD_WITHIN)
        assert time.monotonic() - started < HEARD_WITHIN
        assert newcomer.members() == by_name(truth + [newcomer.me])  # its welcome alone
        truth.append(newcomer.me)
        everyone.append(newcomer)
    await all_see(everyone + [alice_b], truth)
    assert (await redis_members(cluster, "general"))[alice_a.id] == 2  # held by both processes

    # Closing alice's tab on A keeps her (her tab on B is open): nobody hears her leave.
    await alice_a.close()
    await asyncio.sleep(0.5)  # several windows of a small room
    for socket in [on_a, on_b, bob]:
        assert socket.members() == by_name(truth), socket.members()
        assert leaves_of(socket, alice_b.id) == []
    assert (await redis_members(cluster, "general"))[alice_b.id] == 1
    # Her last tab goes: every socket on both processes hears it within 1 s.
    await alice_b.close()
    truth.remove(alice_b.me)
    remaining = [socket for socket in everyone if socket is not alice_a]
    assert await all_see(remaining, truth, timeout=HEARD_WITHIN) < HEARD_WITHIN
    assert alice_b.id not in await redis_members(cluster, "general")

    # Another room, joined on both processes at once: each join ack's snapshot plus the events
    # after it is the truth (a snapshot may not show yet what is still in the batching window).
    late = remaining[-1]  # the newcomer on B
    acks = await asyncio.gather(*(socket.call("join", {"room": "side"}) for socket in (on_a, bob, late)))
    for socket, ack in zip((on_a, bob, late), acks):
        assert ack["ok"] is True and socket.me in ack["online"]
        assert all(m in (on_a.me, bob.me, late.me) for m in ack["online"]), ack
    await all_see([on_a, bob, late], [on_a.me, bob.me, late.me], room="side", timeout=HEARD_WITHIN)
    assert (await bob.call("leave", {"room": "side"}))["ok"] is True
    await all_see([on_a, late], [on_a.me, late.me], room="side", timeout=HEARD_WITHIN)

    # On both processes: the welcome with every event applied twice is the truth (idempotent).
    for observer in observers:
        twice = {m["id"]: m for m in observer.welcome["online"]}
        for event in presence_events(observer):
            apply_presence(twice, event)
            apply_presence(twice, event)
        assert by_name(twice.values()) == by_name(truth)


async def test_joiners_on_one_process_miss_nothing_while_sessions_come_and_go_on_the_other(cluster, visitors):
    """The snapshot rule across processes: sockets that join on B while sessions keep arriving
    and leaving on A each end with the truth (snapshot + later events, nothing missed)."""
    a, b = cluster.a.url, cluster.b.url
    stable = [await tab(visitors, a) for _ in range(3)]
    churning = True

    async def churn() -> None:
        while churning:
            socket = await tab(visitors, a)
            await asyncio.sleep(0.02)
            await socket.close()

    churners = [asyncio.ensure_future(churn()) for _ in range(4)]
    joiners = []
    try:
        for _ in range(12):
            joiners.append(await tab(visitors, b))
            await asyncio.sleep(0.05)
    finally:
        churning = False
        await asyncio.gather(*churners)
    truth = [socket.me for socket in stable + joiners]
    await all_see(stable + joiners, truth, timeout=3.0)
    assert sorted(await redis_members(cluster, "general")) == sorted(m["id"] for m in truth)
    for socket in stable + joiners:
        await socket.close()


async def test_a_missed_change_is_found_by_its_number_and_the_room_read_again(cluster, visitors):
    """A change lost between Redis and a process (here: made in Redis without being published)
    is noticed at the room's next change, whose number skips one; the room is read again and
    every socket hears the difference."""
    from redis.asyncio import Redis

    observer = await tab(visitors, cluster.b.url)
    await observer.sees("general", [observer.me])
    ghost = {"id": "ghost-member-0001", "name": "ghost", "account": None}
    redis = Redis.from_url(cluster.redis.url)
    try:
        # Taken like a process would, but the change never reaches the channel.
        await redis.hset(f"{PREFIX}room:general:members", ghost["id"], json.dumps(ghost))
        await redis.hset(f"{PREFIX}room:general:holders", ghost["id"], 1)
        await redis.incr(f"{PREFIX}room:general:seq")
        await asyncio.sleep(0.3)
        assert observer.members() == [observer.me]  # not heard: it was never published
        newcomer = await tab(visitors, cluster.a.url)  # the next change, numbered one too far
        await observer.sees("general", [observer.me, newcomer.me, ghost], timeout=HEARD_WITHIN)
        await redis.hdel(f"{PREFIX}room:general:members", ghost["id"])
        await redis.hdel(f"{PREFIX}room:general:holders", ghost["id"])
        await redis.incr(f"{PREFIX}room:general:seq")
        # Nothing follows now: the heartbeats see Redis's number stay ahead, and read the room.
        await observer.sees("general", [observer.me, newcomer.me], timeout=3 * HEARTBEAT_SECONDS + 1)
    finally:
        await redis.aclose()
    await observer.close()
    await newcomer.close()


async def test_presence_changes_cross_redis_as_numbered_changes_not_as_lists(cluster, visitors):
    """What crosses Redis per change is one small message naming the room, its number and the
    member, never the room's list; the events themselves stay on each process."""
    from redis.asyncio import Redis

    redis = Redis.from_url(cluster.redis.url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(CHANNEL, "chatd")
    try:
        crowd = [await tab(visitors, cluster.a.url) for _ in range(5)]
        await published_on(pubsub, 0.5)  # theirs
        newcomer = await tab(visitors, cluster.b.url)
        published = await published_on(pubsub, 1.0)
        changes = [json.loads(data) for channel, data in published if channel == CHANNEL]
        assert len(changes) == 1, published
        room, number, change, member = changes[0]
        assert (room, change, json.loads(member)) == ("general", "+", newcomer.me) and number > 0
        assert not any('"presence"' in data for channel, data in published if channel == "chatd"), published
        for socket in [*crowd, newcomer]:
            await socket.close()
    finally:
        await pubsub.aclose()
        await redis.aclose()


# -- a process that stops ------------------------------------------------------------------------


async def sockets_on(process: ChatdProcess) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(process.url + "/metrics") as response:
            text = await response.text()
    return int(float(re.search(r"^chatd_sockets_connected (\S+)$", text, re.M).group(1)))


async def nginx_pick(cluster: Cluster, visitors) -> tuple[ChatdProcess, ChatdProcess]:
    """(the process nginx sends this machine's clients to, the other one)."""
    probe = await tab(visitors, cluster.nginx.url)
    counts = [await sockets_on(process) for process in cluster.processes]
    await probe.close()
    assert sorted(counts) == [0, 1], counts
    return (cluster.a, cluster.b) if counts[0] else (cluster.b, cluster.a)


async def test_kill_9_of_a_process_removes_its_members_within_15_s_and_its_clients_recover_through_nginx(
    fresh_cluster, visitors
):
    cluster = fresh_cluster
    victim, survivor = await nginx_pick(cluster, visitors)
    via_nginx = cluster.nginx.url
    # On the survivor: an observer in two rooms, a sender, and one tab of a session that also has one on the victim.
    observer = await tab(visitors, survivor.url)
    assert (await observer.call("join", {"room": "side"}))["ok"] is True
    sender = await tab(visitors, survivor.url)
    both_visitor = await visitors(via_nginx)
    both_on_victim = await both_visitor.socket()
    await both_on_victim.next("welcome")
    both_on_survivor = await tab(visitors, survivor.url, cookie_from=both_visitor)
    # On the victim (through nginx): sessions that will not come back, and ones that will.
    gone = [await tab(visitors, via_nginx) for _ in range(3)]
    for socket in gone:
        assert (await socket.call("join", {"room": "side"}))["ok"] is True
    returning_visitors = [await visitors(via_nginx) for _ in range(2)]
    returning = []
    for visitor in returning_visitors:
        socket = await visitor.socket(transport="polling")
        await socket.next("welcome")
        returning.append(socket)
    assert await sockets_on(victim) == 1 + len(gone) + len(returning)
    truth = [observer.me, sender.me, both_on_survivor.me] + [s.me for s in gone + returning]
    await all_see([observer] + gone + returning, truth)
    await all_see([observer], [observer.me] + [s.me for s in gone], room="side")

    # Messages before the kill reach the victim's clients through Redis.
    for i in range(3):
        assert (await sender.call("send chat", {"msg": f"before {i}"}))["ok"] is True
    last_seen = {}
    for socket in returning:
        while True:
            message = await socket.next("new chat")
            if message["msg"] == "before 2":
                last_seen[socket] = message["id"]
                break

    victim.stop(signal.SIGKILL)
    killed = time.monotonic()
    # While its clients are away, more messages are stored through the survivor.
    missed = []
    for i in range(10):
        ack = await sender.call("send chat", {"msg": f"while away {i}"})
        assert ack["ok"] is True
        missed.append(ack["id"])

    # Its clients reconnect through nginx (now to the survivor) and catch up with `history` `after`.
    for visitor, old in zip(returning_visitors, returning):
        await asyncio.wait_for(old.disconnected.wait(), 30)
        socket = await connect_socket(via_nginx, cookie=visitor.cookie, transport="polling")
        visitor.sockets.append(socket)
        assert (await socket.next("welcome"))["id"] == old.id
        answer = await socket.call("history", {"room": "general", "after": last_seen[old]})
        assert answer["ok"] is True
        assert [m["id"] for m in answer["messages"]] == missed
        assert [m["msg"] for m in answer["messages"]] == [f"while away {i}" for i in range(10)]
    assert await sockets_on(survivor) == 3 + len(returning)

    # The survivor gives back the dead process's holds and its sockets hear the leaves, within 15 s.
    truth = [observer.me, sender.me, both_on_survivor.me] + [s.me for s in returning]
    await observer.sees("general", truth, timeout=DEAD_GONE_WITHIN - (time.monotonic() - killed))
    await observer.sees("side", [observer.me], timeout=DEAD_GONE_WITHIN - (time.monotonic() - killed))
    took = time.monotonic() - killed
    assert took < DEAD_GONE_WITHIN
    print(f"\nkill -9: its members left on the survivor after {took:.1f} s")
    for socket in gone:
        assert len(leaves_of(observer, socket.id)) == 1 and len(leaves_of(observer, socket.id, "side")) == 1
    # Sessions still open on the survivor never left: the one with a tab there, the ones that came back.
    for member in (both_on_survivor.me, *(s.me for s in returning)):
        assert leaves_of(observer, member["id"]) == []
    # A newcomer's snapshot is the truth; Redis holds nothing of the dead process.
    newcomer = await tab(visitors, survivor.url)
    assert newcomer.members() == by_name(truth + [newcomer.me])
    held = await redis_members(cluster, "general")
    assert sorted(held) == sorted(m["id"] for m in truth + [newcomer.me]) and set(held.values()) == {1}
    assert await redis_members(cluster, "side") == {observer.id: 1}


async def test_a_process_that_stops_cleanly_gives_its_members_back_at_once(fresh_cluster, visitors):
    cluster = fresh_cluster
    observer = await tab(visitors, cluster.a.url)
    leaving = [await tab(visitors, cluster.b.url) for _ in range(3)]
    await observer.sees("general", [observer.me] + [s.me for s in leaving])
    started = time.monotonic()
    assert cluster.b.stop(signal.SIGTERM) == 0
    await observer.sees("general", [observer.me], timeout=2.0)
    print(f"\nSIGTERM: its members left on the other process {time.monotonic() - started:.2f} s after the signal")
    from redis.asyncio import Redis

    redis = Redis.from_url(cluster.redis.url)
    try:
        processes = await redis.smembers(f"{PREFIX}processes")
        assert len(processes) == 1  # only A is left
        assert await redis.keys(f"{PREFIX}process:*") == [f"{PREFIX}process:{processes.pop().decode()}".encode()]
    finally:
        await redis.aclose()


async def test_a_process_that_stalls_past_its_heartbeat_comes_back_with_its_members(fresh_cluster, visitors):
    """SIGSTOP for longer than the heartbeat's expiry: the other process gives its holds back
    (its members leave); on SIGCONT it finds its heartbeat gone, takes its places again, and
    every view converges on the truth."""
    cluster = fresh_cluster
    observer = await tab(visitors, cluster.a.url)
    stalling = [await tab(visitors, cluster.b.url) for _ in range(2)]
    truth = [observer.me] + [s.me for s in stalling]
    await all_see([observer, *stalling], truth)
    cluster.b.proc.send_signal(signal.SIGSTOP)
    try:
        await observer.sees("general", [observer.me], timeout=ALIVE_SECONDS + 2 * HEARTBEAT_SECONDS + 2)
    finally:
        cluster.b.proc.send_signal(signal.SIGCONT)
    await all_see([observer, *stalling], truth, timeout=2 * HEARTBEAT_SECONDS + 2)
    assert sorted(await redis_members(cluster, "general")) == sorted(m["id"] for m in truth)


async def test_presence_is_rebuilt_when_redis_restarts_empty(fresh_cluster, visitors):
    """Redis keeps nothing durable: after a restart with no data, each process finds its
    heartbeat gone, takes its sessions' places again and reads its rooms again."""
    cluster = fresh_cluster
    observer = await tab(visitors, cluster.a.url)
    members = [await tab(visitors, cluster.b.url) for _ in range(2)]
    truth = [observer.me] + [m.me for m in members]
    await all_see([observer, *members], truth)
    port = cluster.redis.port
    cluster.redis.stop()
    cluster.redis = start_redis(port)
    deadline = time.monotonic() + 3 * HEARTBEAT_SECONDS + 3
    while sorted(await redis_members(cluster, "general")) != sorted(m["id"] for m in truth):
        assert time.monotonic() < deadline, await redis_members(cluster, "general")
        await asyncio.sleep(0.2)
    await all_see([observer, *members], truth, timeout=3 * HEARTBEAT_SECONDS)
    # And it works as before: a change on one process is heard on the other.
    newcomer = await tab(visitors, cluster.b.url)
    await members[0].close()
    truth = [observer.me, members[1].me, newcomer.me]
    await all_see([observer, members[1], newcomer], truth, timeout=HEARD_WITHIN + 1)


# -- the store on its own ----------------------------------------------------------------------


async def test_holds_are_counted_per_process_and_a_batch_sent_twice_changes_nothing(redis_service):
    """Two stores ("processes") on one Redis, with their own publish callbacks: a session held
    by both is one member; the scripts are idempotent, which is what lets a process send a
    batch again after an error."""
    from redis.asyncio import Redis

    from chatd.presence.redis import RedisPresence

    heard: dict[str, list] = {"p": [], "q": []}

    def publish_to(name: str):
        async def publish(room, joins, leaves, count) -> None:
            heard[name].append((room, [m["id"] for m in joins], [m["id"] for m in leaves]))

        return publish

    async def heard_by_both(event, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(event in events for events in heard.values()):
            assert time.monotonic() < deadline, heard
            await asyncio.sleep(0.01)

    redis = Redis.from_url(redis_service.url)
    p, q = RedisPresence(publish_to("p"), redis), RedisPresence(publish_to("q"), redis)
    x = {"id": "member-x", "name": "x", "account": None}
    try:
        await p.start()
        await q.start()
        await p.join("general", "p-socket-1", x)
        await q.join("general", "q-socket-1", x)  # the same session, a tab on the other process
        await p.join("general", "p-socket-2", x)  # a second tab on p: no new hold
        await heard_by_both(("general", ["member-x"], []))
        await asyncio.sleep(0.2)
        assert heard == {"p": [("general", ["member-x"], [])], "q": [("general", ["member-x"], [])]}
        assert await redis.hgetall(f"{PREFIX}room:general:holders") == {b"member-x": b"2"}
        assert (await q.snapshot("general", {"id": "new", "name": "y", "account": None})).text == (
            '[{"id":"member-x","name":"x","account":null},{"id":"new","name":"y","account":null}]'
        )
        # p's join sent again, then p's leave twice: p's hold counts once, and is given back once.
        await p._write([("join", "general", x)])
        await p._write([("leave", "general", x), ("leave", "general", x)])
        await asyncio.sleep(0.3)
        assert await redis.hgetall(f"{PREFIX}room:general:holders") == {b"member-x": b"1"}
        assert all(len(events) == 1 for events in heard.values()), heard  # x is still in, on q
        await q.leave("general", "q-socket-1", x)
        await heard_by_both(("general", [], ["member-x"]))
        assert await redis.exists(f"{PREFIX}room:general:holders", f"{PREFIX}room:general:members") == 0
    finally:
        await p.close()
        await q.close()
        await redis.aclose()
