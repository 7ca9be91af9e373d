"""Filling one room: handshakes per second as the room grows, and the server's CPU per handshake.

    .venv/bin/python bench/presence.py [--sockets 5000] [--concurrency 100] [--repeat 3] [--redis]

Starts `python -m chatd` pinned to CPU 0 (taskset) and the clients pinned to
CPU 1: the load generator of `make bench` (bench/loadgen, Node and `ws`; run
`make bench` or `npm ci` there once), which speaks Engine.IO v4 by hand and
drops what it does not need unread, so the client is not the bottleneck (a
Python client on CPU 1 was: reading every socket's presence frames, it
saturated its core while chatd's was not). Every socket is a new guest, as
in a crowd arriving: GET / (the page, which issues the session cookie), then
a websocket to /socket.io/, the namespace CONNECT, the `welcome`; the socket
then stays in `general`, answering pings. Prints, for each successive tenth
of the room, handshakes per second, the server's CPU time per handshake (from
/proc, so it does not depend on the client; with the kernel's part of it,
system time, beside it), how busy each core was and how much of the server's
core the hypervisor took (steal, in /proc/stat: on a shared host it comes and
goes, and a tenth with much of it is slow for reasons not chatd's), then the
server's CPU for half of the room disconnecting at once. With `--redis`, chatd runs with a
throwaway redis-server (`--redis-url`, so presence is the Redis store of
chatd/presence/redis.py; Redis's own CPU is not counted). With
`--collections`, each run also prints chatd's garbage collections over its
life (start-up, warm-up, fill, drop) per generation: how many, the longest and
their sum; each is a pause of the whole process (bench/gc_hook).

Why 100 handshakes in flight: the one client core also reads what 5,000
people's machines would, every socket's `presence` frame (thousands of frames
a second once the room is large). With 20 in flight, while it read such a
burst the handshake pipeline ran dry and the server's core sat idle for up
to a fifth of the last tenth (busy 81–86 % there, 95–98 % in the first, with
the same CPU per handshake in both), so the figure measured the client's
bursts. With 100 the server's core stays busy in the last tenths too (the
table's "server busy" column shows it), more so since each socket, once
welcomed, is read without `ws` (`Client.skim` in loadgen.js: every payload
skipped unread, pings answered; a header it cannot read fails the run):
through `ws`, the last tenths were 92 % busy against 97 % in the first (mean of
15 runs), skimmed 97-99 % in every tenth. Each tenth is timed with that many in
flight all along: the clock starts once the first 100 have finished (until
then the pipeline fills, and a first tenth timed from the first launch carries
the unfinished work of the 100 in flight at its end, about 10 % more than its
share), and 100 more guests than the last mark are started (else the last
tenth ends with the pipeline draining and the server waiting on the last round
trips: 85-91 % busy in it with 100 in flight, 50-56 % with 200). So the tenths
are sockets 100-600, ..., 4,600-5,100 of the room. Before the timed fill,
`--warmup` guests come and go, so the first tenth is timed on a warm server.
Each run starts a fresh chatd; the figure is the median of the runs' last
tenth / first tenth, because one tenth lasts about a second on a shared machine.
Where a tenth is shorter than the presence window (0.9 s at 5,000), one tenth
holds a flush and the next may not, and the tenth rates alternate; the same
ratio over fifths (two tenths each) is printed beside it as a check, and the
slope of the server's CPU per handshake against the room's size (least squares
over all ten tenths, in µs per 1,000 sockets): what the room's size costs each
handshake, read from every tenth rather than two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen" / "loadgen.js"
SERVER_CPU, CLIENT_CPU = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """The process's CPU time, every thread's, in the scheduler's nanoseconds (/proc, Linux):
    bench/rooms50.py reads it per chunk of handshakes, a tenth of a second, where clock
    ticks would be 10 ms steps."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def fill(base: str, args: argparse.Namespace, pid: int) -> dict:
    """The clients: the load generator of `make bench` (Node, `ws`) on CPU 1."""
    argv = ["taskset", "-c", str(CLIENT_CPU), "node", str(LOADGEN), "fill", "--url", base, "--pid", str(pid),
            "--server-cpu", str(SERVER_CPU), "--sockets", str(args.sockets), "--concurrency", str(args.concurrency),
            "--prefill", str(args.warmup), "--timeout", "600"]
    result = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    if "error" in result:
        raise SystemExit(f"the load generator failed: {result}")
    if result.get("skim_errors"):
        raise SystemExit(f"the load generator lost its place in a socket's frames: {result['skim_errors']} bad headers")
    return result


def fifths(tenths: list[dict]) -> float:
    """Last fifth / first fifth: the rate over two tenths (as many handshakes each) is their harmonic mean."""

    def rate(a: dict, b: dict) -> float:
        return 2 / (1 / a["handshakes_per_s"] + 1 / b["handshakes_per_s"])

    return rate(tenths[-2], tenths[-1]) / rate(tenths[0], tenths[1])


def growth(tenths: list[dict]) -> float:
    """µs of server CPU per handshake added per 1,000 sockets in the room: the least-squares
    slope over every tenth, so less at the mercy of one tenth than the ratio of two."""
    sizes = [(tenth["from"] + tenth["to"]) / 2 / 1000 for tenth in tenths]
    costs = [tenth["server_cpu_ms_each"] * 1000 for tenth in tenths]
    return statistics.linear_regression(sizes, costs).slope


def print_run(number: int, result: dict) -> tuple[float, float, float]:
    """One run's table; returns its last tenth / first tenth, the same over fifths, and `growth`."""
    print(f"run {number}:")
    print(f"{'sockets in the room':>22} {'handshakes/s':>13} {'server CPU/handshake':>21}"
          f" {'of it system':>13} {'server busy':>12} {'client busy':>12} {'stolen':>7}")
    for tenth in result["tenths"]:
        label = f"{tenth['from']}–{tenth['to']}"
        print(f"{label:>22} {tenth['handshakes_per_s']:13.0f} {tenth['server_cpu_ms_each']:18.2f} ms"
              f" {tenth['server_system_ms_each']:10.2f} ms {tenth['server_busy']:12.0%} {tenth['client_busy']:12.0%}"
              f" {tenth['server_core_stolen']:7.0%}")
    first, last = result["tenths"][0]["handshakes_per_s"], result["tenths"][-1]["handshakes_per_s"]
    by_fifths = fifths(result["tenths"])
    print(f"last tenth / first tenth: {last / first:.2f} (over fifths: {by_fifths:.2f})")
    grows = growth(result["tenths"])
    print(f"server CPU per handshake grows by {grows:+.0f} µs per 1,000 sockets in the room (least squares)")
    print(f"{result['skimmed']} of the sockets read without ws after their welcome")
    print(f"{result['dropped']} sockets dropping at once: {result['drop_server_cpu_s']:.2f} s server CPU in all")
    return last / first, by_fifths, grows


def print_collections(log: Path) -> None:
    """The collections bench/gc_hook timed in one chatd: per generation, how many, the longest, the sum."""
    timed = json.loads(log.read_text())
    parts = []
    for generation in (0, 1, 2):
        pauses = [seconds * 1000 for gen, seconds in timed if gen == generation]
        longest = max(pauses, default=0.0)
        parts.append(f"generation {generation}: {len(pauses)}, longest {longest:.0f} ms, {sum(pauses):.0f} ms in all")
    print("collections: " + "; ".join(parts))


@contextlib.contextmanager
def serving(*options: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """A fresh chatd (new process, empty data directory) on SERVER_CPU: its URL and pid."""
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        server = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), sys.executable, "-m", "chatd", "--port", str(port),
             "--data-dir", data_dir, "--log-level", "warning", *options],
            cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            assert "serving on" in server.stdout.readline()
            yield f"http://127.0.0.1:{port}", server.pid
        finally:
            server.terminate()
            server.wait()


def run_once(args: argparse.Namespace, extra: list[str], number: int) -> tuple[float, float, float]:
    """A fresh chatd filled once; its table printed (print_run's ratios returned)."""
    with tempfile.TemporaryDirectory() as scratch:
        env = None
        log = Path(scratch) / "collections.json"
        if args.collections:
            env = {**os.environ, "PYTHONPATH": str(ROOT / "bench" / "gc_hook"), "CHATD_BENCH_GC_LOG": str(log)}
        with serving("--guest-rate", "0", *extra, env=env) as (url, pid):
            result = fill(url, args, pid)
        ratios = print_run(number, result)
        if args.collections:  # written as chatd exited
            print_collections(log)
        return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes in flight (see the docstring)")
    parser.add_argument("--warmup", type=int, default=1000, help="guests that come and go first, 200 at a time")
    parser.add_argument("--repeat", type=int, default=3, help="runs, each on a fresh chatd; the median is the figure")
    parser.add_argument("--redis", action="store_true", help="with a throwaway Redis (presence across processes)")
    parser.add_argument("--collections", action="store_true", help="time chatd's garbage collections too")
    args = parser.parse_args()
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}; "
          f"{args.sockets} sockets, {args.concurrency} handshakes in flight, after {args.warmup} warm-up guests")
    redis = None
    extra: list[str] = []
    if args.redis:
        sys.path.insert(0, str(ROOT / "tests"))
        from redis_service import start_redis

        redis = start_redis()
        extra = ["--redis-url", redis.url]
        print(f"with Redis at {redis.url} (presence: chatd/presence/redis.py)")
    try:
        runs = [run_once(args, extra, number) for number in range(1, args.repeat + 1)]
    finally:
        if redis is not None:
            redis.stop()
    if len(runs) > 1:
        for label, ratios in (("last tenth / first tenth", [r[0] for r in runs]), ("over fifths", [r[1] for r in runs])):
            shown = ", ".join(f"{ratio:.2f}" for ratio in ratios)
            print(f"{label} over {len(ratios)} runs: {shown}; median {statistics.median(ratios):.2f}")
        slopes = [r[2] for r in runs]
        shown = ", ".join(f"{slope:+.0f}" for slope in slopes)
        print(f"growth per 1,000 sockets over {len(slopes)} runs: {shown} µs; median {statistics.median(slopes):+.0f} µs")


if __name__ == "__main__":
    main()
