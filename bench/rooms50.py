"""A session in 50 rooms: the server's CPU per handshake, against a session in `general` only.

    .venv/bin/python bench/rooms50.py [--handshakes 300] [--repeat 3]

Starts `python -m chatd` pinned to CPU 0 (taskset) on a fresh data dir; this
client runs pinned to CPU 1. Two accounts: `one` is in `general` only, `fifty`
in general and 49 more rooms. Another account writes 20 messages to each room
(so the welcome's RoomStates have unread counts to count) and keeps a socket
open in all 50 rooms (the rooms have people: their presence events are part of
the cost). Then, for each account in turn, `--handshakes` times in a row: a
websocket to /socket.io/, the namespace CONNECT, the `welcome`, close — with
no other socket of the account open (the worst case: its presence changes in
every room) and, as a second figure, with one other tab of it open (presence
does not change). The server's CPU comes from /proc (the scheduler's
nanoseconds for each of its threads), so the client does not count. The two
accounts take turns, `--chunk` handshakes each (the order swapped every
round), so that a host that is slower for a few seconds slows both alike:
measured one after the other, `one` then `fifty`, ratios of single runs
spread 0.97–1.87 on a shared machine. Prints CPU per handshake for each and
the ratio fifty / one; the figure is the median ratio over `--repeat` runs,
each on a fresh chatd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time

import aiohttp

from presence import cpu_seconds, serving  # bench/presence.py, beside this file

SERVER_CPU, CLIENT_CPU = 0, 1
PASSWORD = "correct horse"
ROOMS = ["general"] + [f"room-{i:02d}" for i in range(1, 50)]


class Account:
    def __init__(self, base: str, username: str) -> None:
        self.base, self.username = base, username
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def register(self) -> None:
        async with self.http.post(
            self.base + "/api/register", json={"username": self.username, "password": PASSWORD}
        ) as response:
            assert response.status == 201, await response.text()

    @property
    def cookie(self) -> str:
        return next(m.value for m in self.http.cookie_jar if m.key == "chatd_session")

    async def connect(self) -> tuple[aiohttp.ClientWebSocketResponse, dict]:
        ws = await self.http.ws_connect(
            self.base.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket",
            headers={"Cookie": f"chatd_session={self.cookie}"},
        )
        assert (await ws.receive_str()).startswith("0{")
        await ws.send_str("40")
        while True:
            frame = await ws.receive_str()
            if frame.startswith('42["welcome"'):
                return ws, json.loads(frame[2:])[1]

    async def call(self, ws, number: int, event: str, payload: dict) -> dict:
        await ws.send_str(f"42{number}" + json.dumps([event, payload]))
        while True:
            frame = await ws.receive_str()
            if frame == "2":
                await ws.send_str("3")
            elif frame.startswith(f"43{number}["):
                return json.loads(frame[len(f"43{number}") :])[0]

    async def close(self) -> None:
        await self.http.close()


async def drain(ws) -> None:
    """Read and drop what a resident socket is sent, answering pings."""
    async for frame in ws:
        if frame.type != aiohttp.WSMsgType.TEXT:
            break
        if frame.data == "2":
            await ws.send_str("3")


SETTLE = 0.2  # seconds: a room of two publishes presence within its 0.05 s window


async def chunk(account: Account, count: int, pid: int, idle: float) -> float:
    """Server CPU seconds for `count` handshakes (connect, welcome, close) in a row and the
    presence changes they cause (published within SETTLE), less what the idle server uses."""
    before = cpu_seconds(pid)
    for _ in range(count):
        ws, welcome = await account.connect()
        await ws.close()
    await asyncio.sleep(SETTLE)
    return cpu_seconds(pid) - before - SETTLE * idle


async def side_by_side(accounts: dict[str, Account], count: int, size: int, pid: int, idle: float) -> dict[str, float]:
    """Server CPU milliseconds per handshake of each account, `count` each, taking turns `size` at a time."""
    totals = dict.fromkeys(accounts, 0.0)
    order = list(accounts)
    for _ in range(count // size):
        for label in order:
            totals[label] += await chunk(accounts[label], size, pid, idle)
        order.reverse()
    return {label: total * 1000 / (count // size * size) for label, total in totals.items()}


async def measure(base: str, pid: int, handshakes: int, size: int) -> dict:
    one, fifty, writer = Account(base, "one"), Account(base, "fifty"), Account(base, "writer")
    try:
        for account in (one, fifty, writer):
            await account.register()
        ws, _ = await fifty.connect()
        writer_ws, _ = await writer.connect()
        number = 0
        for room in ROOMS[1:]:
            for account_ws, account in ((ws, fifty), (writer_ws, writer)):
                number += 1
                ack = await account.call(account_ws, number, "join", {"room": room})
                assert ack["ok"] is True, ack
        for room in ROOMS:
            for i in range(20):
                number += 1
                ack = await writer.call(writer_ws, number, "send chat", {"room": room, "msg": f"message {i}"})
                assert ack["ok"] is True or ack.get("error") == "rate_limited", ack
                if not ack["ok"]:
                    await asyncio.sleep(ack["retry_after"])
        await ws.close()
        resident = asyncio.ensure_future(drain(writer_ws))  # the rooms have somebody in them
        _, welcome = await fifty.connect()
        assert len(welcome["rooms"]) == 50 and all(r["unread"] == 20 for r in welcome["rooms"]), welcome["rooms"]
        await asyncio.sleep(1.2)
        start = cpu_seconds(pid)
        await asyncio.sleep(2.0)
        idle = (cpu_seconds(pid) - start) / 2.0
        accounts = {"one": one, "fifty": fifty}
        await side_by_side(accounts, handshakes // 5, size, pid, idle)  # warm-up
        figures = await side_by_side(accounts, handshakes, size, pid, idle)
        # With another tab of each open: presence does not change.
        tabs = []
        for account in accounts.values():
            tab, _ = await account.connect()
            tabs.append(tab)
            tabs.append(asyncio.ensure_future(drain(tab)))
        tabbed = await side_by_side(accounts, handshakes, size, pid, idle)
        figures.update({label + " (another tab open)": ms for label, ms in tabbed.items()})
        resident.cancel()
        for item in tabs:
            if isinstance(item, asyncio.Future):
                item.cancel()
            else:
                await item.close()
        return figures
    finally:
        for account in (one, fifty, writer):
            await account.close()


def run_once(handshakes: int, size: int) -> dict:
    with serving("--chat-rate", "0") as (url, pid):
        return asyncio.run(measure(url, pid, handshakes, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=50, help="handshakes per turn (see the docstring)")
    args = parser.parse_args()
    if args.handshakes // 5 < args.chunk:
        raise SystemExit("--handshakes must be at least 5 × --chunk (the warm-up is a fifth of it)")
    os.sched_setaffinity(0, {CLIENT_CPU})
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}; "
          f"{args.handshakes} handshakes per figure, {args.chunk} at a time, the accounts taking turns")
    ratios: dict[str, list[float]] = {"": [], " (another tab open)": []}
    for number in range(1, args.repeat + 1):
        started = time.monotonic()
        figures = run_once(args.handshakes, args.chunk)
        shown = ", ".join(f"{label} {ms:.2f} ms" for label, ms in figures.items())
        print(f"run {number} ({time.monotonic() - started:.0f} s): server CPU per handshake: {shown}")
        for suffix in ratios:
            ratios[suffix].append(figures["fifty" + suffix] / figures["one" + suffix])
    for suffix, values in ratios.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"50 rooms / general only{suffix}: {shown}; median {statistics.median(values):.2f}")


if __name__ == "__main__":
    main()
