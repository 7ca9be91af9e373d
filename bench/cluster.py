"""Server CPU per delivered `new chat`: one chatd process alone vs two processes sharing Redis.

    .venv/bin/python bench/cluster.py [--receivers 200] [--senders 10] [--messages 50] [--rounds 2]

Starts a throwaway PostgreSQL and Redis (tests/pg_service.py, tests/redis_service.py),
then, for each round and each setup, a fresh database and:

- one process: one `python -m chatd --database-url …` serving every socket;
- two processes: two chatd processes with the same `--database-url` and
  `--redis-url`, each serving half the sockets (so every message crosses Redis
  to the other half, through each process's sequencer).

Every socket (raw Engine.IO over websocket, straight to a process) joins one
room; the senders, spread like the receivers, send their messages at once, each
waiting for its ack. A delivery is one `new chat` reaching one socket (senders
included). Measured from the first send until every socket has every message:
the chatd processes' CPU time (from /proc, so this client's own work does not
count) divided by the deliveries, Redis's CPU alongside. Storage is the same
PostgreSQL in both setups. Numbers depend on the machine; compare the lines of
one run with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ChatdProcess  # noqa: E402
from engineio_clients import RawWebsocketClient  # noqa: E402
from pg_service import create_database, find_bin_dir, start_postgres  # noqa: E402
from redis_service import redis_missing, start_redis  # noqa: E402
from presence import cpu_seconds  # noqa: E402  (bench/presence.py, beside this file)

ROOM = "bench"


async def run_load(urls: list[str], receivers: int, senders: int, messages: int, pids: list[int], redis_pid: int):
    """Connect, join, send; (wall seconds, chatd CPU seconds, Redis CPU seconds, deliveries)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        cookies = []
        for url in urls:
            async with http.get(url + "/api/session") as response:
                cookies.append(response.cookies["chatd_session"].value)
        clients = [RawWebsocketClient(http, urls[i % len(urls)], cookies[i % len(urls)]) for i in range(receivers + senders)]

        async def join(client: RawWebsocketClient) -> None:
            await client.connect()
            assert (await client.call("join", {"room": ROOM}))["ok"] is True

        try:
            for start in range(0, len(clients), 50):  # not all handshakes at once
                await asyncio.gather(*(join(c) for c in clients[start : start + 50]))
            sending = clients[receivers:]

            async def send(client: RawWebsocketClient, n: int) -> None:
                for i in range(messages):
                    ack = await client.call("send chat", {"room": ROOM, "msg": f"sender {n} message {i}"})
                    assert ack["ok"] is True, ack

            total = senders * messages
            started, cpu_before, redis_before = time.monotonic(), sum(map(cpu_seconds, pids)), cpu_seconds(redis_pid)
            await asyncio.gather(*(send(c, n) for n, c in enumerate(sending)))
            for client in clients:
                while len(client.chats) < total:
                    client.chat_arrived.clear()
                    await asyncio.wait_for(client.chat_arrived.wait(), 120)
            wall = time.monotonic() - started
            cpu = sum(map(cpu_seconds, pids)) - cpu_before
            redis_cpu = cpu_seconds(redis_pid) - redis_before
            for client in clients:  # a sanity check, not part of the measure
                ids = [m["id"] for m in client.chats]
                assert ids == sorted(set(ids)) and len(ids) == total
            return wall, cpu, redis_cpu, total * len(clients)
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receivers", type=int, default=200)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--messages", type=int, default=50, help="per sender")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if find_bin_dir() is None or redis_missing():
        print("bench/cluster.py needs PostgreSQL and redis-server (make system-deps)", file=sys.stderr)
        return 2
    postgres, redis = start_postgres(), start_redis()
    key = os.popen(f"{sys.executable} -m chatd keygen").read().strip()
    print(
        f"{args.receivers} receivers + {args.senders} senders in one room, {args.messages} messages per sender; "
        f"server CPU per delivered `new chat` (µs)",
        flush=True,
    )
    try:
        with tempfile.TemporaryDirectory() as directory:
            for round_ in range(1, args.rounds + 1):
                for setup, count in (("one process", 1), ("two processes + Redis", 2)):
                    database_url = create_database(postgres.url, f"bench_{round_}_{count}")
                    flags = ["--database-url", database_url, "--chat-rate", "0", "--guest-rate", "0",
                             "--log-level", "warning"]
                    if count == 2:
                        flags += ["--redis-url", redis.url]
                    processes = [
                        ChatdProcess(*flags, data_dir=Path(directory) / f"{round_}-{count}-{i}" / "data",
                                     env={"CHATD_SECRET_KEYS": key})  # fmt: skip
                        for i in range(count)
                    ]
                    try:
                        urls = [process.start() for process in processes]
                        wall, cpu, redis_cpu, deliveries = asyncio.run(
                            run_load(urls, args.receivers, args.senders, args.messages,
                                     [p.proc.pid for p in processes], redis.proc.pid)  # fmt: skip
                        )
                    finally:
                        for process in processes:
                            if process.proc is not None:
                                process.stop()
                    extra = f", Redis {1e6 * redis_cpu / deliveries:5.2f} µs" if count == 2 else ""
                    print(
                        f"round {round_}  {setup:<22} {1e6 * cpu / deliveries:6.2f} µs chatd CPU per delivery{extra}"
                        f"  ({deliveries} deliveries in {wall:.1f} s, {deliveries / wall:,.0f}/s)",
                        flush=True,
                    )
    finally:
        redis.stop()
        postgres.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
