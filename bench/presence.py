"""Filling one room: handshakes per second as the room grows, and the server's CPU per handshake.

    .venv/bin/python bench/presence.py [--sockets 5000] [--concurrency 20] [--redis]

Starts `python -m chatd` pinned to CPU 0 (taskset) and the clients pinned to
CPU 1: the load generator of `make bench` (bench/loadgen, Node and `ws`; run
`make bench` or `npm ci` there once), which speaks Engine.IO v4 by hand and
drops what it does not need unread, so the client is not the bottleneck (a
Python client on CPU 1 was: reading every socket's presence frames, it
saturated its core while chatd's was not). Every socket is a new guest, as
in a crowd arriving: GET / (the page, which issues the session cookie), then
a websocket to /socket.io/, the namespace CONNECT, the `welcome`; the socket
then stays in `general`, answering pings. Prints,
for each successive tenth of the room, handshakes per second and the server's
CPU time per handshake (from /proc, so it does not depend on the client), then
the server's CPU for half of the room disconnecting at once. With `--redis`,
chatd runs with a throwaway redis-server (`--redis-url`, so presence is the
Redis store of chatd/presence/redis.py; Redis's own CPU is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen" / "loadgen.js"
SERVER_CPU, CLIENT_CPU = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill(base: str, sockets: int, concurrency: int, pid: int) -> None:
    """The clients: the load generator of `make bench` (Node, `ws`) on CPU 1."""
    argv = ["taskset", "-c", str(CLIENT_CPU), "node", str(LOADGEN), "fill", "--url", base, "--pid", str(pid),
            "--sockets", str(sockets), "--concurrency", str(concurrency), "--timeout", "600"]
    result = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    if "error" in result:
        raise SystemExit(f"the load generator failed: {result}")
    print(f"{'sockets in the room':>22} {'handshakes/s':>13} {'server CPU/handshake':>21}")
    for tenth in result["tenths"]:
        label = f"{tenth['from']}–{tenth['to']}"
        print(f"{label:>22} {tenth['handshakes_per_s']:13.0f} {tenth['server_cpu_ms_each']:18.2f} ms")
    first, last = result["tenths"][0]["handshakes_per_s"], result["tenths"][-1]["handshakes_per_s"]
    print(f"last tenth / first tenth: {last / first:.2f}")
    print(f"{result['dropped']} sockets dropping at once: {result['drop_server_cpu_s']:.2f} s server CPU in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--redis", action="store_true", help="with a throwaway Redis (presence across processes)")
    args = parser.parse_args()
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
            fill(f"http://127.0.0.1:{port}", args.sockets, args.concurrency, server.pid)
        finally:
            server.terminate()
            server.wait()
            if redis is not None:
                redis.stop()


if __name__ == "__main__":
    main()
