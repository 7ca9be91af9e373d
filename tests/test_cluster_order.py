"""Ordered, exactly-once delivery across two chatd processes (issue 13, acceptance 1).

Through nginx, many sockets spread over two processes that share Redis and
PostgreSQL; 12 senders, six on each process, send 40 messages each into one
room at once. Every socket — receivers and senders alike — must get every acked
message exactly once, in increasing id order; sockets that join while the
messages flow must get a history and live messages that meet exactly (no
message in both, none in neither).

Every test client comes from 127.0.0.1, so nginx's production `ip_hash` would
send them all to one process. This cluster's nginx balances on a query
argument instead (`hash $arg_client`): each client repeats its own value on
every request, so a polling client sticks to one process as ip_hash would make
it, and different clients spread over both. The production template
(deploy/nginx-chatd.conf) keeps ip_hash.

The clients are raw Engine.IO ones (tests/engineio_clients.py): 200
python-socketio AsyncClients would cost the 2-core test box more than the chatd
processes under test.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from cluster_service import Cluster, running_cluster
from engineio_clients import TRANSPORTS, RawClient, RawWebsocketClient

pytestmark = pytest.mark.cluster

SENDERS_PER_PROCESS = 6
MESSAGES_PER_SENDER = 40
LATE_JOINERS = 10
SESSIONS = 8  # receivers share a few sessions, as tabs do
DELIVERED_WITHIN = 60.0  # seconds after the last ack: generous, the box is shared
# Receivers through nginx, for each transport (3-13 s each on a shared 2-core box).
RECEIVERS = {"websocket": 200, "polling": 200}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_server) -> Cluster:
    flags = ["--chat-rate", "0", "--metrics"]  # no chat limit for the senders
    root = tmp_path_factory.mktemp("cluster-order")
    with running_cluster(root, pg_server[0], *flags, balance="hash $arg_client;") as cluster:
        yield cluster


@pytest.fixture
async def http():
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar())
    yield session
    await session.close()


async def guest_cookie(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/api/session") as response:
        assert response.status == 200
        return response.cookies["chatd_session"].value


async def sockets_connected(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("chatd_sockets_connected "):
                return int(float(line.split()[1]))
    raise AssertionError("no chatd_sockets_connected in /metrics")


def highest_id(client: RawClient) -> int:
    """The last message id a client has, live or (a late joiner's) in its join's history."""
    last = [*client.join_ack["history"][-1:], *client.chats[-1:]]
    return max((m["id"] for m in last), default=0)


async def wait_for_id(client: RawClient, last_id: int, deadline: float) -> None:
    # A late joiner may have everything in its history, and nothing live to wait for.
    while highest_id(client) < last_id:
        client.chat_arrived.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0 or client.closed:
            return  # the assertions say what is missing
        try:
            await asyncio.wait_for(client.chat_arrived.wait(), remaining)
        except asyncio.TimeoutError:
            return


async def send_all(sender: RawClient, room: str, name: str) -> list[int]:
    ids = []
    for i in range(MESSAGES_PER_SENDER):
        ack = await sender.call("send chat", {"room": room, "msg": f"{name} #{i}"})
        assert ack.get("ok") is True, ack
        ids.append(ack["id"])
    return ids


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_every_socket_gets_every_acked_message_once_in_order(cluster, http, transport):
    room = f"order-{transport}"
    client_class = TRANSPORTS[transport]
    cookies = [await guest_cookie(http, cluster.nginx.url) for _ in range(SESSIONS)]
    clients: list[RawClient] = []

    async def joined(client: RawClient) -> RawClient:
        clients.append(client)
        await client.connect()
        client.join_ack = await client.call("join", {"room": room})
        assert client.join_ack["ok"] is True, client.join_ack
        return client

    try:
        # The receivers, through nginx, spread over both processes by their `client` key.
        receivers = await asyncio.gather(
            *(
                joined(client_class(http, cluster.nginx.url, cookies[i % SESSIONS], {"client": f"r{i}"}))
                for i in range(RECEIVERS[transport])
            )
        )
        assert all(r.join_ack["history"] == [] for r in receivers)  # a fresh room
        counts = [await sockets_connected(http, process.url) for process in cluster.processes]
        assert sum(counts) >= RECEIVERS[transport] and min(counts) >= RECEIVERS[transport] // 4, counts
        # The senders: six on each process (websocket, straight to the process).
        placed = [(process.url, await guest_cookie(http, process.url)) for process in cluster.processes]
        senders = await asyncio.gather(
            *(joined(RawWebsocketClient(http, url, cookie)) for url, cookie in placed for _ in range(SENDERS_PER_PROCESS))
        )

        sending = asyncio.gather(*(send_all(s, room, f"sender {n}") for n, s in enumerate(senders)))
        # Late joiners: they join while the messages flow, through nginx. New sessions: a socket of
        # a session already in the room is in it from its connect (its rooms follow the session).
        late_cookies = [await guest_cookie(http, cluster.nginx.url) for _ in range(LATE_JOINERS)]
        await asyncio.sleep(0.3)
        late = []
        for i in range(LATE_JOINERS):
            late.append(await joined(client_class(http, cluster.nginx.url, late_cookies[i], {"client": f"late{i}"})))
            await asyncio.sleep(0.05)
        acked = sorted(i for ids in await sending for i in ids)

        total = 2 * SENDERS_PER_PROCESS * MESSAGES_PER_SENDER
        assert acked == list(range(1, total + 1))  # per-room ids: gapless, shared by both processes
        deadline = time.monotonic() + DELIVERED_WITHIN
        await asyncio.gather(*(wait_for_id(c, acked[-1], deadline) for c in [*receivers, *senders, *late]))

        for client in [*receivers, *senders]:
            ids = [m["id"] for m in client.chats if m["room"] == room]
            assert ids == acked, (client.query, transport, _difference(ids, acked))
        for client in late:
            history = [m["id"] for m in client.join_ack["history"]]
            live = [m["id"] for m in client.chats if m["room"] == room]
            # Where history stops, live delivery starts: no message in both, none in neither.
            seen = history + live
            assert seen and seen == list(range(seen[0], total + 1)), (history, live)
            assert len(history) == 50 or seen[0] == 1, history  # a full history page, or all there is
        # And the messages are the ones sent: text and room as acked, from the shared storage.
        texts = {m["id"]: m["msg"] for m in receivers[0].chats}
        assert sorted(texts.values()) == sorted(f"sender {n} #{i}" for n in range(12) for i in range(40))
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


def _difference(ids: list[int], expected: list[int]) -> str:
    missing = sorted(set(expected) - set(ids))
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    out_of_order = [(a, b) for a, b in zip(ids, ids[1:]) if b <= a][:5]
    return f"{len(ids)} received; missing {missing[:10]}…; repeated {repeated[:10]}; out of order {out_of_order}"


async def test_a_message_stored_but_never_published_is_fetched_by_every_process_in_order(cluster):
    """As if a process stored a message and died (kill -9) before publishing it: the next
    message of the room is held, and after the hold every process reads the missing one
    from storage and delivers both, in order."""
    from chatd.storage.postgres import PostgresStorage
    from conftest import Visitor

    room = "order-gap"
    visitors = [Visitor(process.url) for process in cluster.processes]
    storage = PostgresStorage(cluster.database_url)
    await storage.open()
    try:
        sockets = [await visitor.socket() for visitor in visitors]  # one on each process
        for socket in sockets:
            assert (await socket.call("join", {"room": room}))["ok"] is True
        lost = await storage.add_message(room, "ghost", None, "stored, never published", time.time())
        started = time.monotonic()
        ack = await sockets[0].call("send chat", {"room": room, "msg": "the next one"})
        assert ack == {"ok": True, "id": lost["id"] + 1, "rev": lost["rev"] + 1}
        for socket in sockets:
            first, second = await socket.next("new chat"), await socket.next("new chat")
            assert (first, second["id"], second["msg"]) == (lost, ack["id"], "the next one")
        assert time.monotonic() - started >= 0.25  # held for the hold (0.3 s), then fetched
        for socket in sockets:
            await socket.nothing("new chat", wait=0.5)  # and each exactly once
    finally:
        await storage.close()
        for visitor in visitors:
            await visitor.close()
