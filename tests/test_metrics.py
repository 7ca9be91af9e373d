"""`--metrics` (issue 9, acceptance 4): GET /metrics in Prometheus' text format,
parsed with prometheus_client's own parser, moving as people connect and chat;
404 without the flag."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conftest import Visitor, refusal


async def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    """Every sample, keyed by (name, sorted labels)."""
    async with aiohttp.ClientSession() as http, http.get(base_url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_without_the_flag_there_is_no_metrics_page(base_url):
    async with aiohttp.ClientSession() as http, http.get(base_url + "/metrics") as response:
        assert response.status == 404


async def test_metrics_move_when_people_connect_and_chat(start_chatd):
    base_url = await start_chatd(metrics=True)
    before = await scrape(base_url)
    assert value(before, "chatd_sockets_connected") == 0
    assert value(before, "chatd_members_online") == 0
    assert value(before, "process_resident_memory_bytes") > 0  # the process collector
    assert ("process_cpu_seconds_total", ()) in before

    alice, bob = Visitor(base_url), Visitor(base_url)
    try:
        tab1, tab2 = await alice.socket(), await alice.socket()  # one session, two tabs
        bob_socket = await bob.socket(transport="polling")
        await tab1.next("welcome"), await tab2.next("welcome"), await bob_socket.next("welcome")
        assert (await tab1.call("join", {"room": "lobby"}))["ok"]
        for text in ("hello", "there"):
            assert (await bob_socket.call("send chat", {"msg": text}))["ok"]
        assert (await tab1.call("join", {"room": "Not A Room"}))["error"] == "invalid_room"
        await tab2.emit("send chat", {"msg": "   "})  # no ack: chat_error, counted all the same
        assert (await tab2.next("chat_error"))["error"] == "invalid_message"
        assert await refusal(base_url, cookie=None) == {"message": "unauthorized", "data": {"reason": "no_session"}}
        assert await refusal(base_url, cookie=alice.cookie, headers={"Origin": "https://evil.example"}) is None

        during = await scrape(base_url)
        assert value(during, "chatd_sockets_connected") == 3
        assert value(during, "chatd_members_online") == 2
        assert value(during, "chatd_rooms_active") == 2  # general and lobby
        assert value(during, "chatd_handshakes_total", result="accepted", reason="") == 3
        assert value(during, "chatd_handshakes_total", result="refused", reason="no_session") == 1
        assert value(during, "chatd_handshakes_total", result="refused", reason="forbidden_origin") >= 1
        assert value(during, "chatd_messages_stored_total") == 2
        assert value(during, "chatd_event_errors_total", code="invalid_room") == 1
        assert value(during, "chatd_event_errors_total", code="invalid_message") == 1
        assert value(during, "chatd_storage_seconds_count", operation="add_message") == 2
        assert value(during, "chatd_storage_seconds_bucket", operation="add_message", le="+Inf") == 2
        assert value(during, "chatd_storage_seconds_sum", operation="add_message") > 0
        # Each room's start (its latest id, ordering.py); welcomes and joins of an empty room read no more.
        assert value(during, "chatd_storage_seconds_count", operation="revision") >= 1  # a room starts from its revision
        assert value(during, "chatd_storage_seconds_count", operation="is_revoked") >= 3  # every handshake

        await bob_socket.close()
        await tab1.close()
    finally:
        await alice.close()
        await bob.close()
    for _ in range(50):  # the disconnects land on the server a moment later
        after = await scrape(base_url)
        if value(after, "chatd_sockets_connected") == 0:
            break
        await asyncio.sleep(0.05)
    assert value(after, "chatd_sockets_connected") == 0
    assert value(after, "chatd_members_online") == 0
    assert value(after, "chatd_rooms_active") == 0
    assert value(after, "chatd_messages_stored_total") == 2  # counters never go back


async def test_the_flag_reaches_a_running_chatd(chatd_process):
    process = chatd_process("--metrics")
    url = process.start()
    samples = await scrape(url)
    assert value(samples, "chatd_sockets_connected") == 0
    assert value(samples, "process_open_fds") > 0
