"""Socket.IO handshakes per second against chatd, with and without each tuning choice.

    .venv/bin/python bench/handshakes.py [--seconds 5] [--concurrency 50]

Starts `bench/serve_variant.py` once per variant (each in its own process, on
its own port and data dir), then runs handshakes from this process: a
websocket to /socket.io/ carrying a valid session cookie, the namespace
CONNECT, the `welcome` event, close. Prints one line per variant: handshakes
per second, and the server's own CPU time per handshake (from /proc, so it
does not depend on how fast this client is). Numbers depend on the machine;
compare the lines of one run with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from presence import cpu_seconds, free_port  # bench/presence.py, beside this file

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "chatd as shipped (uvloop, orjson, gc.freeze)": [],
    "  without uvloop": ["--asyncio"],
    "  without orjson": ["--stdlib-json"],
    "  without gc.freeze": ["--no-gc-freeze"],
    "library defaults (none of the three)": ["--asyncio", "--stdlib-json", "--no-gc-freeze"],
}


async def handshake(http: aiohttp.ClientSession, url: str, cookie: str) -> None:
    async with http.ws_connect(url, headers={"Cookie": f"chatd_session={cookie}"}) as ws:
        assert (await ws.receive_str()).startswith("0{")
        await ws.send_str("40")
        assert (await ws.receive_str()).startswith("40")  # the CONNECT answer…
        while not (await ws.receive_str()).startswith('42["welcome"'):
            pass  # …then `welcome`


async def measure(base: str, seconds: float, concurrency: int, pid: int) -> tuple[float, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async with http.get(base + "/api/session") as response:
            cookie = response.cookies["chatd_session"].value
        url = base.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        for _ in range(50):  # warm up
            await handshake(http, url, cookie)
        done = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await handshake(http, url, cookie)
                done += 1

        started, cpu_before = time.monotonic(), cpu_seconds(pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu_before
        return done / elapsed, 1000 * cpu / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    for label, flags in VARIANTS.items():
        with tempfile.TemporaryDirectory() as data_dir:
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "serve_variant.py"), str(port), data_dir, *flags],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert server.stdout.readline().strip() == "ready"
                rate, cpu_ms = asyncio.run(
                    measure(f"http://127.0.0.1:{port}", args.seconds, args.concurrency, server.pid)
                )
            finally:
                server.terminate()
                server.wait()
        print(f"{label:<70} {rate:6.0f} handshakes/s {cpu_ms:6.2f} ms server CPU each", flush=True)


if __name__ == "__main__":
    main()
