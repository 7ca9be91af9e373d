"""One presence batch to every socket of a large room: the server's CPU per socket.

    .venv/bin/python bench/fanout.py [--sockets 5000] [--joins 1,100,800] [--rounds 20]

What `bench/presence.py`'s fill pays on top of the handshakes, measured alone
and many times over, so that a change to the fan-out shows above the noise
(the fill's tenths last about half a second each and move by ±20 %). chatd
runs in this process, as `python -m chatd` would (uvloop, its collector
settings), pinned to CPU 0; the load generator (`hold`: guests welcomed,
then read without `ws`, as in the fill) pinned to CPU 1 holds `--sockets`
guests in `general`. Then, for each batch size, `--rounds` times: one
`presence` event of that many joins (made-up Members of the usual size) sent
through the client manager's `emit_in_slices`, as presence sends it, then a
pause for the clients to read it. The CPU of those rounds, less that of as
many rounds without an event, per socket, split into the process's own
(user: Python) and the kernel's (system: the socket writes; on loopback
the kernel also does much of the receiving side's TCP work on this CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import secrets
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from chatd.__main__ import tune_runtime  # noqa: E402
from chatd.config import config_from_args, load_secret_keys  # noqa: E402
from chatd.rooms import chat_room  # noqa: E402
from chatd.web import REALTIME, create_app  # noqa: E402

LOADGEN = ROOT / "bench" / "loadgen" / "loadgen.js"
SERVER_CPU, CLIENT_CPU = 0, 1
PAUSE = 0.15  # seconds after each round: the clients read the event before the next


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def members(n: int) -> list[dict]:
    """Made-up Members as a fill's guests are: a 16-character id, guest-NNNN, no account."""
    return [{"id": secrets.token_urlsafe(12), "name": f"guest-{i % 10000:04d}", "account": None} for i in range(n)]


async def rounds(manager, room: str, batch: dict | None, count: int) -> tuple[float, float]:
    u0, s0 = cpu()
    for _ in range(count):
        if batch is not None:
            await manager.emit_in_slices("presence", batch, "/", room)
        await asyncio.sleep(PAUSE)
    u1, s1 = cpu()
    return u1 - u0, s1 - s0


async def bench(args: argparse.Namespace, data_dir: str) -> None:
    config = config_from_args(["--port", "0", "--data-dir", data_dir, "--guest-rate", "0", "--log-level", "warning"])
    config = dataclasses.replace(config, secret_keys=load_secret_keys(config.data_dir))
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    tune_runtime()
    client = await asyncio.create_subprocess_exec(
        "taskset", "-c", str(CLIENT_CPU), "node", str(LOADGEN), "hold", "--url", f"http://127.0.0.1:{port}",
        "--sockets", str(args.sockets), "--concurrency", "100", "--timeout", "600",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        ready = json.loads(await client.stdout.readline())
        if "ready" not in ready:
            raise SystemExit(f"the load generator failed: {ready}")
        manager = app[REALTIME].sio.manager
        room = chat_room("general")
        await asyncio.sleep(3)  # the guests' own presence batches are out
        in_room = len(list(manager.get_participants("/", room)))
        print(f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}; server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}; "
              f"{in_room} sockets in the room, {args.rounds} rounds per batch size")
        print(f"{'joins per batch':>16} {'frame bytes':>12} {'CPU per socket':>15} {'of it system':>13}")
        idle_u, idle_s = await rounds(manager, room, None, args.rounds)
        for joins in (int(j) for j in args.joins.split(",")):
            batch = {"room": "general", "joins": members(joins), "leaves": [], "count": in_room}
            size = len(json.dumps(["presence", batch], separators=(",", ":"))) + 2
            await rounds(manager, room, batch, 2)  # warm
            used_u, used_s = await rounds(manager, room, batch, args.rounds)
            writes = args.rounds * in_room
            user = (used_u - idle_u) / writes * 1e6
            system = (used_s - idle_s) / writes * 1e6
            print(f"{joins:>16,} {size:>12,} {user + system:>12.1f} µs {system:>10.1f} µs")
    finally:
        client.stdin.close()
        await client.wait()
        await runner.cleanup()
    result = json.loads((await client.stdout.read()).decode().splitlines()[-1])
    if result.get("skim_errors"):
        raise SystemExit(f"the load generator lost its place in a socket's frames: {result['skim_errors']} bad headers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--joins", default="1,100,800", help="batch sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two CPUs: chatd on CPU 0, the load generator on CPU 1")
    os.sched_setaffinity(0, {SERVER_CPU})
    import uvloop

    with tempfile.TemporaryDirectory() as data_dir:
        uvloop.run(bench(args, data_dir))


if __name__ == "__main__":
    main()
