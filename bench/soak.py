"""A soak: chatd under steady churn for a long while, with nothing allowed to grow or drift.

    .venv/bin/python bench/soak.py [--minutes 30] [--out soak-results]    (or `make soak`)

Starts `python -m chatd` (SQLite in a temp dir, `--metrics`, chat and new-identity limits off)
pinned to CPU 0 with taskset, and runs the load in this process, pinned to CPU
1, all on 127.0.0.1:

- steady chat: one sender per room (ROOMS rooms) at CHAT_RATE messages a second,
  each message carrying its send time;
- steady observers in every room (websocket and polling) that stay connected
  from start to end: every message acked must reach each of them exactly once;
- churn: sockets connecting (the handshake timed), joining a room, staying a
  few seconds and leaving, about CHURN_RATE a second, at most CHURN_MAX at once;
- a few slow readers that join the first room (busier, and its messages
  long) and stop reading but answer pings blindly: chatd must cut them off
  for their backlog; renewed every SLOW_RENEW seconds;
- a reconnect storm every STORM_EVERY seconds (or three in a short run): every
  churn socket dropped at once and as many connecting at once, like clients
  after a restart.

Every minute it writes a row to soak.csv: chatd's RSS, open file descriptors
and asyncio tasks (`/metrics`), the minute's handshake and delivery p99,
messages sent, lost and doubled (so far), slow readers cut off (so far),
handshake errors; and at the end soak.png (matplotlib, the `bench` extra).

It fails (exit 1) if RSS over the last third of the run is more than 5 %
above the middle third, if any message was lost or doubled, or if the
handshake or delivery p99 of the last third is more than 50 % above the
middle third's. It stops by itself after `--minutes`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from chatd.sessions import COOKIE_NAME  # noqa: E402
from engineio_clients import RawPollingClient, RawWebsocketClient  # noqa: E402

SERVER_CPU, CLIENT_CPU = "0", 1
ROOMS = 4
CHAT_RATE = 5.0  # messages a second per room
BUSY_RATE = 25.0  # in the first room, where the slow readers are: 2 000 characters each, 50 kB/s
OBSERVERS = (3, 1)  # steady websocket and polling observers per room
CHURN_RATE = 4.0  # new sockets a second
CHURN_MAX = 150  # churn sockets at once, at most
CHURN_STAY = (5.0, 40.0)  # seconds a churn socket stays
SLOW_READERS = 3
SLOW_RENEW = 150.0  # seconds
STORM_EVERY = 180.0
LOST_GRACE = 10.0  # a message acked this long ago must have reached every observer
RSS_GROWTH, P99_DRIFT = 0.05, 0.50


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Soak:
    def __init__(self, url: str, port: int, pid: int, minutes: float) -> None:
        self.url, self.port, self.pid = url, port, pid
        self.seconds = minutes * 60
        self.http: aiohttp.ClientSession | None = None
        self.rooms = [f"soak-{i}" for i in range(ROOMS)]
        self.acked: dict[tuple[str, int], float] = {}  # (room, message id) -> when acked
        self.observers: list = []
        self.seen: list[dict[int, int]] = []  # per observer: message id -> times received
        self.observed_rooms: list[str] = []  # per observer (ids count per room)
        self.churn: set = set()
        self.slow: list[socket.socket] = []
        self.handshakes: list[float] = []  # this minute's
        self.deliveries: list[float] = []  # this minute's
        self.handshake_errors = 0
        self.send_errors = 0
        self.sent_this_minute = 0
        self.rows: list[dict] = []
        self.stop = asyncio.Event()

    # -- clients ---------------------------------------------------------------------------

    async def cookie(self) -> str:
        async with self.http.get(self.url + "/api/session", headers={"Cookie": ""}) as response:
            return response.cookies[COOKIE_NAME].value

    async def connect(self, client_class=RawWebsocketClient, room: str | None = None):
        client = client_class(self.http, self.url, await self.cookie())
        started = time.monotonic()
        await client.connect(timeout=30)
        self.handshakes.append(time.monotonic() - started)
        if room is not None:
            ack = await client.call("join", {"room": room})
            assert ack["ok"], ack
        return client

    def watch(self, client, index: int) -> None:
        """Count every `new chat` the observer gets, and how late."""
        seen = self.seen[index]

        def record(packet: str, handle=client._handle):
            if packet.startswith('42["new chat"'):
                chat = json.loads(packet[2:])[1]
                if chat["room"] == self.observed_rooms[index]:
                    seen[chat["id"]] = seen.get(chat["id"], 0) + 1
                sent = float(chat["msg"].split("|", 1)[0])
                self.deliveries.append(time.monotonic() - sent)
                return asyncio.sleep(0)
            return handle(packet)

        client._handle = record

    async def sender(self, room: str) -> None:
        client = await self.connect(room=room)
        # The slow readers' room gets long messages: enough to fill their buffers within the run.
        padding = "x" * 1980 if room == self.rooms[0] else ""
        interval = 1.0 / (BUSY_RATE if padding else CHAT_RATE)
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += interval
            try:
                ack = await client.call("send chat", {"msg": f"{time.monotonic():.6f}|soak{padding}", "room": room})
            except (asyncio.TimeoutError, aiohttp.ClientError, AssertionError):
                self.send_errors += 1
                continue
            if ack.get("ok"):
                self.acked[(room, ack["id"])] = time.monotonic()
                self.sent_this_minute += 1
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await client.close()

    async def churn_one(self) -> None:
        try:
            client = await self.connect(room=random.choice(self.rooms))
        except Exception:
            self.handshake_errors += 1
            return
        self.churn.add(client)
        try:
            await asyncio.wait_for(self.stop.wait(), random.uniform(*CHURN_STAY))
        except asyncio.TimeoutError:
            pass
        if client in self.churn:
            self.churn.discard(client)
            await client.close()

    async def churner(self) -> None:
        tasks: set[asyncio.Task] = set()
        while not self.stop.is_set():
            if len(self.churn) < CHURN_MAX:
                task = asyncio.ensure_future(self.churn_one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(random.expovariate(CHURN_RATE))
        await asyncio.gather(*tasks, return_exceptions=True)

    async def storm(self) -> None:
        """Drop every churn socket at once, then connect as many at once."""
        dropped = list(self.churn)
        self.churn.clear()
        await asyncio.gather(*(client.close() for client in dropped), return_exceptions=True)
        await asyncio.gather(*(self.churn_one() for _ in dropped), return_exceptions=True)

    async def slow_reader(self) -> socket.socket:
        """A websocket that joins the busiest room and never reads again (see tests/test_slow_readers.py)."""
        cookie = await self.cookie()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", self.port))
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        await loop.sock_sendall(sock, (
            f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nCookie: {COOKIE_NAME}={cookie}\r\n\r\n").encode())  # fmt: skip
        for text in (b"40", b'42["join",{"room":"%s"}]' % self.rooms[0].encode()):
            await loop.sock_sendall(sock, bytes([0x81, 0x80 | len(text), 0, 0, 0, 0]) + text)
        return sock

    async def slow_readers(self) -> None:
        """Renewed every SLOW_RENEW seconds; meanwhile each answers pings blindly (a PONG every
        20 s, never reading), so that it is the backlog that closes it, not the ping timeout."""
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            for sock in self.slow:
                sock.close()
            self.slow = [await self.slow_reader() for _ in range(SLOW_READERS)]
            renew_at = loop.time() + SLOW_RENEW
            while not self.stop.is_set() and loop.time() < renew_at:
                try:
                    await asyncio.wait_for(self.stop.wait(), 20)
                except asyncio.TimeoutError:
                    pass
                for sock in self.slow:
                    try:
                        sock.send(bytes([0x81, 0x81, 0, 0, 0, 0]) + b"3")
                    except OSError:
                        pass  # closed by chatd, as it should be
        for sock in self.slow:
            sock.close()

    # -- measuring -------------------------------------------------------------------------

    async def metrics(self) -> dict[str, float]:
        async with self.http.get(self.url + "/metrics") as response:
            text = await response.text()
        found = {}
        for name in ("chatd_asyncio_tasks", "chatd_connections_closed_slow_total", "chatd_sockets_connected"):
            match = re.search(rf"^{name} (\S+)$", text, re.M)
            found[name] = float(match.group(1)) if match else 0.0
        return found

    def lost_and_doubled(self, grace: float) -> tuple[int, int]:
        due = [key for key, at in self.acked.items() if time.monotonic() - at > grace]
        lost = sum(
            1 for seen, room in zip(self.seen, self.observed_rooms) for (r, i) in due if r == room and i not in seen
        )
        doubled = sum(n - 1 for seen in self.seen for n in seen.values() if n > 1)
        return lost, doubled

    async def sample(self, minute: int) -> dict:
        with open(f"/proc/{self.pid}/status") as f:
            rss = int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        metrics = await self.metrics()
        lost, doubled = self.lost_and_doubled(LOST_GRACE)
        row = {
            "minute": minute,
            "rss_mib": round(rss / 2**20, 2),
            "fds": fds,
            "tasks": int(metrics["chatd_asyncio_tasks"]),
            "sockets": int(metrics["chatd_sockets_connected"]),
            "handshake_p99_ms": round(p99(self.handshakes) * 1000, 2),
            "delivery_p99_ms": round(p99(self.deliveries) * 1000, 2),
            "sent": self.sent_this_minute,
            "lost": lost,
            "doubled": doubled,
            "slow_closed": int(metrics["chatd_connections_closed_slow_total"]),
            "handshake_errors": self.handshake_errors,
            "send_errors": self.send_errors,
        }
        self.handshakes, self.deliveries, self.sent_this_minute = [], [], 0
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        return row

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> list[dict]:
        connector = aiohttp.TCPConnector(limit=0)  # a connection per socket: no pool limit
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as self.http:
            for room in self.rooms:
                for client_class, n in zip((RawWebsocketClient, RawPollingClient), OBSERVERS):
                    for _ in range(n):
                        client = await self.connect(client_class, room)
                        self.seen.append({})
                        self.observed_rooms.append(room)
                        self.watch(client, len(self.observers))
                        self.observers.append(client)
            self.handshakes = []
            workers = [asyncio.ensure_future(self.sender(room)) for room in self.rooms]
            workers += [asyncio.ensure_future(self.churner()), asyncio.ensure_future(self.slow_readers())]
            storm_every = min(STORM_EVERY, self.seconds / 3)
            started = time.monotonic()
            next_storm, minute = started + storm_every, 0
            while (now := time.monotonic()) < started + self.seconds:
                next_minute = started + (minute + 1) * 60
                if next_storm < next_minute and next_storm < started + self.seconds - 30:
                    await asyncio.sleep(max(0.0, next_storm - now))
                    print(f"storm: {len(self.churn)} sockets reconnect at once", flush=True)
                    await self.storm()
                    next_storm += storm_every
                    continue
                await asyncio.sleep(max(0.0, next_minute - now))
                minute += 1
                self.rows.append(await self.sample(minute))
            self.stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.sleep(LOST_GRACE / 2)  # the last messages' deliveries
            lost, doubled = self.lost_and_doubled(0.5)
            self.rows[-1].update(lost=lost, doubled=doubled)
            for client in self.observers:
                await client.close()
            for client in list(self.churn):
                await client.close()
        return self.rows


def verdict(rows: list[dict]) -> list[str]:
    """What failed (empty: passed)."""
    third = max(1, len(rows) // 3)
    middle, last = rows[third : 2 * third] or rows[-2:-1], rows[-third:]
    failures = []
    rss_middle = statistics.mean(r["rss_mib"] for r in middle)
    rss_last = statistics.mean(r["rss_mib"] for r in last)
    if rss_last > rss_middle * (1 + RSS_GROWTH):
        failures.append(f"RSS grew {100 * (rss_last / rss_middle - 1):.1f} % (last third over middle third)")
    if rows[-1]["lost"] or rows[-1]["doubled"]:
        failures.append(f"{rows[-1]['lost']} messages lost, {rows[-1]['doubled']} doubled")
    for key in ("handshake_p99_ms", "delivery_p99_ms"):
        before = statistics.median(r[key] for r in middle)
        after = statistics.median(r[key] for r in last)
        if before and after > before * (1 + P99_DRIFT):
            failures.append(f"{key} drifted from {before} to {after}")
    return failures


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    minutes = [r["minute"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        (axes[0][0], ["rss_mib"], "chatd RSS (MiB)"),
        (axes[0][1], ["fds", "tasks", "sockets"], "open fds, asyncio tasks, sockets"),
        (axes[1][0], ["handshake_p99_ms", "delivery_p99_ms"], "p99 (ms) per minute"),
        (axes[1][1], ["lost", "doubled", "slow_closed"], "lost, doubled, slow readers closed (total)"),
    ]
    for ax, keys, title in panels:
        for key in keys:
            ax.plot(minutes, [r[key] for r in rows], marker=".", label=key)
        ax.set_title(title)
        ax.legend(fontsize="small")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minute")
    fig.suptitle(f"chatd soak, {len(rows)} minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else argv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run (default 30)")
    parser.add_argument("--out", type=Path, default=ROOT / "soak-results", help="where soak.csv and soak.png go")
    args = parser.parse_args()
    if args.minutes < 3:
        parser.error("--minutes: at least 3 (the verdict compares the middle and last thirds)")
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {CLIENT_CPU})
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="chatd-soak-") as tmp:
        log = open(Path(tmp) / "chatd.log", "w")
        argv = [sys.executable, "-m", "chatd", "--port", str(port), "--data-dir", str(Path(tmp) / "data"),
                "--chat-rate", "0", "--guest-rate", "0", "--metrics", "--log-level", "warning"]  # fmt: skip
        server = subprocess.Popen(pinned(SERVER_CPU, argv), cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            if "serving on" not in server.stdout.readline():
                print("chatd did not start", file=sys.stderr)
                return 2
            rows = asyncio.run(Soak(f"http://127.0.0.1:{port}", port, server.pid, args.minutes).run())
        finally:
            server.terminate()
            server.wait(10)
            log.close()
    csv_path, png_path = args.out / "soak.csv", args.out / "soak.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plotted = plot(rows, png_path)
    failures = verdict(rows)
    third = max(1, len(rows) // 3)
    summary = (
        f"soak: {len(rows)} minutes; RSS {rows[0]['rss_mib']} → {rows[-1]['rss_mib']} MiB "
        f"(middle third {statistics.mean(r['rss_mib'] for r in rows[third:2 * third] or rows[-2:-1]):.1f}, "
        f"last third {statistics.mean(r['rss_mib'] for r in rows[-third:]):.1f}); "
        f"handshake p99 {rows[-1]['handshake_p99_ms']} ms, delivery p99 {rows[-1]['delivery_p99_ms']} ms (last minute); "
        f"{sum(r['sent'] for r in rows)} messages, {rows[-1]['lost']} lost, {rows[-1]['doubled']} doubled; "
        f"{rows[-1]['slow_closed']} slow readers closed; {rows[-1]['handshake_errors']} handshake errors"
    )
    print(summary)
    print(f"wrote {csv_path}" + (f" and {png_path}" if plotted else ""))
    for failure in failures:
        print("FAIL: " + failure)
    print("soak: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
