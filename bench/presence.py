"""Filling one room: handshakes per second as the room grows, and the server's CPU per handshake.

    .venv/bin/python bench/presence.py [--sockets 5000] [--concurrency 20] [--redis]

Starts `python -m chatd` pinned to CPU 0 (taskset) and runs the clients in
this process pinned to CPU 1. Every socket is a new guest, as in a crowd
arriving: GET / (the page, which issues the session cookie), then a websocket
to /socket.io/ (Engine.IO v4 spoken by hand: no Socket.IO client, so the
client stays cheap), the namespace CONNECT, the `welcome`; the socket then
stays in `general`, answering pings and discarding what it receives. Prints,
for each successive tenth of the room, handshakes per second and the server's
CPU time per handshake (from /proc, so it does not depend on the client), then
the server's CPU for half of the room disconnecting at once. With `--redis`,
chatd runs with a throwaway redis-server (`--redis-url`, so presence is the
Redis store of chatd/presence/redis.py; Redis's own CPU is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU, CLIENT_CPU = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def discard(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Keep a socket alive: answer Engine.IO pings, drop everything else."""
    async for frame in ws:
        if frame.type != aiohttp.WSMsgType.TEXT:
            return
        if frame.data == "2":
            await ws.send_str("3")


async def handshake(http: aiohttp.ClientSession, base: str, ws_url: str) -> aiohttp.ClientWebSocketResponse:
    async with http.get(base + "/") as response:
        await response.read()
        cookie = response.cookies["chatd_session"].value
    ws = await http.ws_connect(ws_url, headers={"Cookie": f"chatd_session={cookie}"}, compress=0)
    assert (await ws.receive_str()).startswith("0{")
    await ws.send_str("40")
    while not (await ws.receive_str()).startswith("40"):
        pass  # `welcome` (and perhaps a `presence`) come before the CONNECT answer
    return ws


async def fill(base: str, sockets: int, concurrency: int, pid: int) -> None:
    tenth = sockets // 10
    ws_url = base.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http:
        open_sockets: list[aiohttp.ClientWebSocketResponse] = []
        readers: list[asyncio.Task] = []
        started = done = 0
        marks = [(time.monotonic(), cpu_seconds(pid))]

        async def worker() -> None:
            nonlocal started, done
            while started < sockets:
                started += 1
                ws = await handshake(http, base, ws_url)
                open_sockets.append(ws)
                readers.append(asyncio.ensure_future(discard(ws)))
                done += 1
                if done % tenth == 0:
                    marks.append((time.monotonic(), cpu_seconds(pid)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        print(f"{'sockets in the room':>22} {'handshakes/s':>13} {'server CPU/handshake':>21}")
        for i in range(1, len(marks)):
            (t0, c0), (t1, c1) = marks[i - 1], marks[i]
            label = f"{(i - 1) * tenth}–{i * tenth}"
            print(f"{label:>22} {tenth / (t1 - t0):13.0f} {1000 * (c1 - c0) / tenth:18.2f} ms", flush=True)
        first, last = marks[1][0] - marks[0][0], marks[-1][0] - marks[-2][0]
        print(f"last tenth / first tenth: {first / last:.2f}")

        await asyncio.sleep(2.0)  # the last presence batches go out
        half = len(open_sockets) // 2
        cpu_before = cpu_seconds(pid)
        for ws in open_sockets[:half]:
            ws._response.connection.transport.abort()  # dropped at once, as when a network goes
        await asyncio.sleep(3.0)
        print(f"{half} sockets dropping at once: {cpu_seconds(pid) - cpu_before:.2f} s server CPU in all")
        for reader in readers:
            reader.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--redis", action="store_true", help="with a throwaway Redis (presence across processes)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CPU})
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}")
    redis = None
    extra: list[str] = []
    if args.redis:
        sys.path.insert(0, str(ROOT / "tests"))
        from redis_service import start_redis

        redis = start_redis()
        extra = ["--redis-url", redis.url]
        print(f"with Redis at {redis.url} (presence: chatd/presence/redis.py)")
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        server = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), sys.executable, "-m", "chatd", "--port", str(port),
             "--data-dir", data_dir, "--log-level", "warning", *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert "serving on" in server.stdout.readline()
            asyncio.run(fill(f"http://127.0.0.1:{port}", args.sockets, args.concurrency, server.pid))
        finally:
            server.terminate()
            server.wait()
            if redis is not None:
                redis.stop()


if __name__ == "__main__":
    main()
