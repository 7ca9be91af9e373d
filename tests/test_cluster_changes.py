"""Every change of a room — new, edited, deleted — reaches every socket exactly once, in
rev order, with no rev missing, across three processes sharing Redis and
PostgreSQL (issue 21, acceptance 2; tests/test_cluster_order.py is the same for
new messages alone, with hundreds of receivers).

Each process has receivers and senders; every sender's session also has an
editor socket on the next process and a deleter socket on the one after, so a
message is sent on one process, edited (some twice) on another and deleted
(every third) on the third, all rooms' worth of traffic at once.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from cluster_service import Cluster, running_cluster
from engineio_clients import RawClient, RawWebsocketClient

pytestmark = pytest.mark.cluster

PROCESSES = 3
RECEIVERS_PER_PROCESS = 4
SESSIONS_PER_PROCESS = 2  # each: a sender here, an editor on the next process, a deleter on the one after
MESSAGES_PER_SENDER = 25
DELIVERED_WITHIN = 30.0
ROOM = "changes"
EVENT_OF = {"new": "new chat", "edited": "chat edited", "deleted": "chat deleted"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_server) -> Cluster:
    root = tmp_path_factory.mktemp("cluster-changes")
    with running_cluster(root, pg_server[0], "--chat-rate", "0", processes=PROCESSES) as cluster:
        yield cluster


async def guest_cookie(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/api/session") as response:
        assert response.status == 200
        return response.cookies["chatd_session"].value


async def ok(client: RawClient, event: str, payload: dict) -> dict:
    ack = await client.call(event, payload)
    assert ack.get("ok") is True, (event, payload, ack)
    return ack


async def test_every_socket_gets_each_change_once_in_rev_order_on_three_processes(cluster):
    urls = [process.url for process in cluster.processes]
    acked: dict[int, tuple[str, int]] = {}  # rev -> (kind, message id)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        clients: list[RawClient] = []

        async def joined(url: str, cookie: str) -> RawClient:
            client = RawWebsocketClient(http, url, cookie)
            clients.append(client)
            await client.connect()
            await ok(client, "join", {"room": ROOM})
            return client

        try:
            receivers = [
                await joined(url, await guest_cookie(http, url)) for url in urls for _ in range(RECEIVERS_PER_PROCESS)
            ]
            crews = []
            for p, url in enumerate(urls):
                for _ in range(SESSIONS_PER_PROCESS):
                    cookie = await guest_cookie(http, url)
                    crews.append([await joined(urls[(p + k) % PROCESSES], cookie) for k in range(3)])

            async def sender(client: RawClient, to_edit: asyncio.Queue, n: int) -> None:
                for i in range(MESSAGES_PER_SENDER):
                    ack = await ok(client, "send chat", {"room": ROOM, "msg": f"crew {n} #{i}"})
                    acked[ack["rev"]] = ("new", ack["id"])
                    await to_edit.put(ack["id"])
                await to_edit.put(None)

            async def editor(client: RawClient, to_edit: asyncio.Queue, to_delete: asyncio.Queue) -> None:
                while (id_ := await to_edit.get()) is not None:
                    for round_ in range(1 if id_ % 4 else 2):  # some twice
                        ack = await ok(client, "edit chat", {"room": ROOM, "id": id_, "msg": f"edit {round_} of {id_}"})
                        acked[ack["rev"]] = ("edited", id_)
                    await to_delete.put(id_)
                await to_delete.put(None)

            async def deleter(client: RawClient, to_delete: asyncio.Queue) -> None:
                while (id_ := await to_delete.get()) is not None:
                    if id_ % 3 == 0:
                        ack = await ok(client, "delete chat", {"room": ROOM, "id": id_})
                        acked[ack["rev"]] = ("deleted", id_)

            work = []
            for n, (sending, editing, deleting) in enumerate(crews):
                to_edit, to_delete = asyncio.Queue(), asyncio.Queue()
                work += [sender(sending, to_edit, n), editor(editing, to_edit, to_delete), deleter(deleting, to_delete)]
            await asyncio.gather(*work)

            last = len(acked)
            assert sorted(acked) == list(range(1, last + 1))  # gapless revs, shared by three processes
            kinds = {kind for kind, _ in acked.values()}
            assert kinds == {"new", "edited", "deleted"}

            deadline = time.monotonic() + DELIVERED_WITHIN
            everyone = [*receivers, *(c for crew in crews for c in crew)]
            for client in everyone:
                while (not client.changes or client.changes[-1][1]["rev"] < last) and time.monotonic() < deadline:
                    client.change_arrived.clear()
                    try:
                        await asyncio.wait_for(client.change_arrived.wait(), max(0.01, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        break
            expected = [(EVENT_OF[kind], id_) for _, (kind, id_) in sorted(acked.items())]
            for client in everyone:
                revs = [data["rev"] for _, data in client.changes]
                assert revs == list(range(1, last + 1)), _difference(revs, last)
                assert [(event, data["id"]) for event, data in client.changes] == expected
                assert all(data["room"] == ROOM for _, data in client.changes)
            # What was delivered is what storage says now: a fresh history equals the replayed changes.
            state: dict[int, dict] = {}
            for event, data in receivers[0].changes:
                if event == "chat deleted":
                    assert set(data) == {"room", "id", "rev"}
                    del state[data["id"]]
                else:
                    state[data["id"]] = data
            history = await ok(receivers[-1], "history", {"room": ROOM, "limit": 100})
            assert history["rev"] == last
            assert history["messages"] == [state[i] for i in sorted(state)][-100:]
        finally:
            await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


def _difference(revs: list[int], last: int) -> str:
    missing = sorted(set(range(1, last + 1)) - set(revs))
    repeated = sorted({r for r in revs if revs.count(r) > 1})
    out_of_order = [(a, b) for a, b in zip(revs, revs[1:]) if b <= a][:5]
    return f"{len(revs)} received of {last}; missing {missing[:10]}; repeated {repeated[:10]}; out of order {out_of_order}"
