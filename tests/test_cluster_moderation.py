"""Moderation and direct rooms across three chatd processes sharing Redis and PostgreSQL
(issue 22, acceptance 2 and 3): a ban issued on one process takes the target's sockets on
the other two out of the room within 1 s and refuses their `join` there; a direct room's
messages reach nobody but its two accounts, whichever process they are on."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster_service import Cluster, running_cluster
from conftest import SocketClient, Visitor
from test_cluster import visitors  # noqa: F401 (fixture: visitors of any process's URL)

pytestmark = pytest.mark.cluster

WITHIN = 1.0  # SPEC: every action takes effect on every process within 1 s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_server) -> Cluster:
    root = tmp_path_factory.mktemp("cluster-moderation")
    with running_cluster(root, pg_server[0], "--chat-rate", "0", "--operator", "oper", processes=3) as cluster:
        yield cluster


async def tab(visitor: Visitor) -> SocketClient:
    socket = await visitor.socket()
    socket.welcome = await socket.next("welcome")
    return socket


async def logged_in(visitors, url: str, username: str, *, register: bool = False) -> Visitor:
    visitor = await visitors(url)
    if register:
        await visitor.register(username)
    else:
        status, body = await visitor.post("/api/login", {"username": username, "password": "correct horse"})
        assert status == 200, body
    return visitor


async def receive(socket: SocketClient, event: str, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        item = await socket.next(event, timeout=max(0.01, deadline - time.monotonic()))
        if predicate(item):
            return item


async def test_a_ban_on_one_process_takes_the_target_out_on_the_other_two_within_1s(cluster, visitors):
    a, b, c = (process.url for process in cluster.processes)
    op = await tab(await logged_in(visitors, a, "oper", register=True))
    target_a = await tab(await logged_in(visitors, a, "spammer", register=True))
    target_b = await tab(await logged_in(visitors, b, "spammer"))  # other sessions of the account
    target_c = await tab(await logged_in(visitors, c, "spammer"))
    guest_c = await tab(await visitors(c))
    watcher_b = await tab(await visitors(b))
    for socket in (target_a, guest_c, watcher_b):
        assert (await socket.call("join", {"room": "moderated"}))["ok"] is True
    for socket in (target_b, target_c):
        assert await socket.next("joined", timeout=WITHIN) == {"room": "moderated"}
    await asyncio.sleep(0.5)  # presence settles
    watcher_b.drain("presence")

    started = time.monotonic()
    assert await op.call("ban", {"room": "moderated", "username": "spammer", "on": True}) == {"ok": True}
    for socket in (target_a, target_b, target_c):
        assert await socket.next("left", timeout=WITHIN) == {"room": "moderated", "reason": "banned"}
    assert time.monotonic() - started < WITHIN
    event = await receive(watcher_b, "presence", lambda e: e["room"] == "moderated", timeout=WITHIN + 1)
    assert {m["account"] for m in event["leaves"]} == {"spammer"}  # its sessions leave presence
    for socket in (target_b, target_c):
        assert (await socket.call("join", {"room": "moderated"}))["error"] == "banned"
        assert (await socket.call("history", {"room": "moderated"}))["error"] == "banned"
    # Sent on A, a message reaches the room's others on B and C, not the banned account's sockets.
    assert (await op.call("join", {"room": "moderated"}))["ok"] is True
    assert (await op.call("send chat", {"room": "moderated", "msg": "order restored"}))["ok"] is True
    for socket in (guest_c, watcher_b):
        await receive(socket, "new chat", lambda m: m["msg"] == "order restored", timeout=2)
    for socket in (target_b, target_c):
        await socket.nothing("new chat", wait=0.2)

    # A guest's ban by member id, and a mute, hold on the other processes at once too.
    member = guest_c.welcome["id"]
    assert await op.call("mute", {"room": "moderated", "member": member, "seconds": 60}) == {"ok": True}
    assert (await guest_c.call("send chat", {"room": "moderated", "msg": "hi"}))["error"] == "muted"


async def test_a_direct_room_reaches_no_third_account_guest_or_operator_on_any_process(cluster, visitors):
    a, b, c = (process.url for process in cluster.processes)
    alice = await tab(await logged_in(visitors, a, "alice", register=True))
    bob = await tab(await logged_in(visitors, b, "bob", register=True))
    eve = await tab(await logged_in(visitors, c, "eve", register=True))
    op = await tab(await logged_in(visitors, c, "oper"))
    guest = await tab(await visitors(b))

    assert (await alice.call("join", {"room": "@alice+bob"}))["ok"] is True
    assert await bob.next("joined", timeout=WITHIN) == {"room": "@alice+bob"}
    sent = await alice.call("send chat", {"room": "@alice+bob", "msg": "for bob only"})
    assert sent["ok"] is True
    assert (await bob.next("new chat", timeout=2))["msg"] == "for bob only"
    for outsider in (eve, op, guest):
        assert (await outsider.call("join", {"room": "@alice+bob"}))["error"] == "forbidden"
        assert (await outsider.call("history", {"room": "@alice+bob"}))["error"] == "forbidden"
        assert (await outsider.call("history", {"room": "@alice+bob", "since": 0}))["error"] == "forbidden"
        await outsider.nothing("new chat", wait=0.1)
