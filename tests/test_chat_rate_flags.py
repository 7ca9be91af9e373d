"""`--chat-burst N` / `--chat-rate R` (issue 9): the operator's chat limit; 0 switches it off."""

from __future__ import annotations

import asyncio

from chatd.config import Config, config_from_args

from conftest import Visitor


def test_the_flags_and_their_environment_variables_reach_the_config():
    config = config_from_args(["--chat-burst", "3", "--chat-rate", "0.5"], environ={})
    assert (config.chat_burst, config.chat_rate) == (3, 0.5)
    config = config_from_args([], environ={"CHATD_CHAT_BURST": "7", "CHATD_CHAT_RATE": "0"})
    assert (config.chat_burst, config.chat_rate) == (7, 0.0)
    assert (Config().chat_burst, Config().chat_rate) == (20, 5.0)  # SPEC's defaults


async def chatter(base_url: str) -> tuple[Visitor, object]:
    visitor = Visitor(base_url)
    socket = await visitor.socket()
    await socket.next("welcome")
    return visitor, socket


async def test_a_small_burst_and_a_slow_rate(start_chatd):
    base_url = await start_chatd(chat_burst=3, chat_rate=2.0)
    visitor, socket = await chatter(base_url)
    try:
        acks = [await socket.call("send chat", {"msg": f"m{i}"}) for i in range(4)]
        assert [ack["ok"] for ack in acks] == [True, True, True, False], acks
        assert acks[3]["error"] == "rate_limited"
        assert 0 < acks[3]["retry_after"] <= 0.5 + 1e-9  # one token at 2 per second
        await asyncio.sleep(acks[3]["retry_after"] + 0.05)
        assert (await socket.call("send chat", {"msg": "after one refill"}))["ok"] is True
        assert (await socket.call("send chat", {"msg": "and no more yet"}))["error"] == "rate_limited"
    finally:
        await visitor.close()


async def test_rate_zero_switches_the_limit_off(start_chatd):
    base_url = await start_chatd(chat_burst=1, chat_rate=0.0)
    visitor, socket = await chatter(base_url)
    try:
        acks = await asyncio.gather(*(socket.call("send chat", {"msg": f"m{i}"}) for i in range(60)))
        assert all(ack["ok"] for ack in acks), [ack for ack in acks if not ack["ok"]][:1]
    finally:
        await visitor.close()


async def test_the_flags_reach_a_running_chatd(chatd_process):
    process = chatd_process("--chat-burst", "2", "--chat-rate", "0.1")
    base_url = process.start()
    visitor, socket = await chatter(base_url)
    try:
        acks = [await socket.call("send chat", {"msg": f"m{i}"}) for i in range(3)]
        assert [ack.get("error") for ack in acks] == [None, None, "rate_limited"], acks
        assert 9 < acks[2]["retry_after"] <= 10 + 1e-9
    finally:
        await visitor.close()
