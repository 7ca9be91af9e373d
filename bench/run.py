"""chatd side by side with the Node stack (express + express-session + socket.io).

    python3 bench/run.py [--repeat 3] [--only connect,fanout-100,...] [--quick]

For every scenario, and every repeat, it starts each server afresh pinned to
core 0 (`taskset`), runs the load generator (`bench/loadgen/loadgen.js`)
pinned to core 1, and stops the server; chatd and the Node peer take turns,
and which goes first alternates between repeats. Then it prints one markdown
table: the median of the repeats for each figure and the chatd / Node ratio.
A figure whose runs all ran out of time says "did not finish".
Needs `npm ci` in bench/loadgen and bench/node-peer and chatd's .venv
(`make bench` does all of it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LOADGEN = BENCH / "loadgen" / "loadgen.js"
NODE_PEER = BENCH / "node-peer" / "server.js"
CHATD_PYTHON = ROOT / ".venv" / "bin" / "python"

SERVER_CORE, LOADGEN_CORE = "0", "1"
PHASE_TIMEOUT = 45  # seconds a connect phase may take before the run "did not finish"


@dataclass
class Scenario:
    key: str
    loadgen: list[str]
    servers: tuple[str, ...] = ("node", "chatd")


SCENARIOS = [
    Scenario("connect-fresh", ["connect", "--sockets", "3000", "--cookies", "fresh"]),
    Scenario("connect-shared", ["connect", "--sockets", "3000", "--cookies", "shared"]),
    Scenario("refuse-none", ["refuse", "--refuse", "none", "--seconds", "4"]),
    Scenario("refuse-tampered", ["refuse", "--refuse", "tampered", "--seconds", "4"]),
    Scenario("fanout-100", ["fanout", "--sockets", "100", "--senders", "10", "--seconds", "4"]),
    Scenario("fanout-1000", ["fanout", "--sockets", "1000", "--senders", "10", "--seconds", "4"]),
    Scenario("fanout-100-deflate", ["fanout", "--sockets", "100", "--senders", "10", "--seconds", "4", "--deflate"]),
    Scenario("fanout-1000-deflate", ["fanout", "--sockets", "1000", "--senders", "10", "--seconds", "4", "--deflate"]),
    Scenario("rate-1000", ["rate", "--sockets", "1000", "--rate", "15", "--senders", "15", "--seconds", "10"]),
    Scenario("memory-1000", ["memory", "--sockets", "1000", "--settle", "2"]),
    Scenario("memory-2000", ["memory", "--sockets", "2000", "--settle", "2"]),
    Scenario("durable", ["durable", "--sockets", "20", "--seconds", "4"], servers=("chatd",)),
    Scenario("durable-client-id", ["durable", "--sockets", "20", "--seconds", "4", "--client-ids"], servers=("chatd",)),
]

# (label, scenario, value from a result, how it is shown, True when higher is better)
ROWS = [
    ("handshakes/s, GET + websocket, 3,000 staying connected", "connect-fresh", "handshakes_per_s", True),
    ("  server CPU ms per handshake", "connect-fresh", "server_cpu_ms_each", False),
    ("handshakes/s, one reused cookie, 3,000 staying", "connect-shared", "handshakes_per_s", True),
    ("  server CPU ms per handshake", "connect-shared", "server_cpu_ms_each", False),
    ("refusals/s, no cookie", "refuse-none", "refusals_per_s", True),
    ("  server CPU ms per refusal", "refuse-none", "server_cpu_ms_each", False),
    ("refusals/s, tampered cookie", "refuse-tampered", "refusals_per_s", True),
    ("  server CPU ms per refusal", "refuse-tampered", "server_cpu_ms_each", False),
    ("deliveries/s, 100 sockets, closed loop", "fanout-100", "deliveries_per_s", True),
    ("  p50 / p99 ms", "fanout-100", "p99_ms", False),
    ("  deliveries per second of server CPU", "fanout-100", "deliveries_per_cpu_s", True),
    ("deliveries/s, 1,000 sockets, closed loop", "fanout-1000", "deliveries_per_s", True),
    ("  p50 / p99 ms", "fanout-1000", "p99_ms", False),
    ("  deliveries per second of server CPU", "fanout-1000", "deliveries_per_cpu_s", True),
    ("deliveries/s, 100 sockets, client offers permessage-deflate", "fanout-100-deflate", "deliveries_per_s", True),
    ("  deliveries per second of server CPU", "fanout-100-deflate", "deliveries_per_cpu_s", True),
    ("deliveries/s, 1,000 sockets, client offers permessage-deflate", "fanout-1000-deflate", "deliveries_per_s", True),
    ("  deliveries per second of server CPU", "fanout-1000-deflate", "deliveries_per_cpu_s", True),
    ("p50 / p99 ms, 1,000 sockets at 15 msg/s", "rate-1000", "p99_ms", False),
    ("  server CPU, % of one core", "rate-1000", "server_cpu_percent", False),
    ("bytes per idle socket, 1,000 sockets", "memory-1000", "bytes_per_socket", False),
    ("bytes per idle socket, 2,000 sockets", "memory-2000", "bytes_per_socket", False),
    ("messages/s stored and acked, fsync on, 20 senders", "durable", "stored_per_s", True),
    ("  the same, every send with a client_id", "durable-client-id", "stored_per_s", True),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") and os.cpu_count() > 1 else argv


class Server:
    """One server process on its own port (and, for chatd, its own data dir)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix="chatd-bench-")
        if kind == "chatd":
            argv = [str(CHATD_PYTHON), "-m", "chatd", "--port", str(self.port), "--data-dir", self.data_dir,
                    "--chat-rate", "0", "--guest-rate", "0"]  # the load generator's guests all come from one address
        else:
            argv = ["node", str(NODE_PEER), str(self.port)]
        self.log = open(Path(self.data_dir) / "server.log", "w+")
        self.process = subprocess.Popen(pinned(SERVER_CORE, argv), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.kind} exited at start-up: {self.log.read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not start listening")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=8)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def run_once(kind: str, scenario: Scenario, quick: bool, shared_cookie: bool = False) -> dict:
    server = Server(kind)
    try:
        argv = ["node", str(LOADGEN), *scenario.loadgen, "--url", f"http://127.0.0.1:{server.port}",
                "--pid", str(server.process.pid), "--timeout", str(PHASE_TIMEOUT)]
        if quick:
            argv += ["--seconds", "2", "--warmup", "0.5"]
        if shared_cookie:
            argv += ["--cookies", "shared"]
        try:
            out = subprocess.run(pinned(LOADGEN_CORE, argv), capture_output=True, text=True,
                                 timeout=PHASE_TIMEOUT + 60).stdout
            result = json.loads(out.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as exc:
            result = {"error": f"load generator failed: {exc}"}
    finally:
        server.stop()
    return derived(result)


def derived(result: dict) -> dict:
    if result.get("deliveries_per_s") and result.get("server_cpu_percent"):
        # What a whole core would deliver: steadier than the rate on a busy machine.
        result["deliveries_per_cpu_s"] = result["deliveries_per_s"] / (result["server_cpu_percent"] / 100)
    return result


@dataclass
class Results:
    runs: dict[tuple[str, str], list[dict]] = field(default_factory=dict)

    def add(self, kind: str, key: str, result: dict) -> None:
        self.runs.setdefault((kind, key), []).append(result)

    def median(self, kind: str, key: str, name: str) -> float | None:
        values = [r[name] for r in self.runs.get((kind, key), []) if "error" not in r and r.get(name) is not None]
        return statistics.median(values) if values else None

    def failures(self, kind: str, key: str) -> int:
        return sum("error" in r for r in self.runs.get((kind, key), []))

    def loss(self, kind: str) -> int:
        return sum(r.get("loss", 0) for (k, _), rs in self.runs.items() if k == kind for r in rs if "error" not in r)


def shown(value: float | None, name: str) -> str:
    if value is None:
        return "did not finish"
    if name == "bytes_per_socket" or value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if name == "server_cpu_ms_each" else f"{value:.1f}"


def cell(results: Results, kind: str, key: str, name: str, scenario: Scenario) -> str:
    if kind not in scenario.servers:
        return "—"
    if name == "p99_ms":
        p50, p99 = results.median(kind, key, "p50_ms"), results.median(kind, key, "p99_ms")
        text = "did not finish" if p99 is None else f"{p50:.0f} / {p99:.0f}"
    else:
        text = shown(results.median(kind, key, name), name)
    failed = results.failures(kind, key)
    if failed and text != "did not finish":
        text += f" ({failed} of {len(results.runs[(kind, key)])} did not finish)"
    return text


def table(results: Results, scenarios: list[Scenario]) -> str:
    by_key = {s.key: s for s in scenarios}
    lines = ["| figure | Node peer | chatd | chatd / Node |", "|---|---|---|---|"]
    for label, key, name, higher_better in ROWS:
        if key not in by_key:
            continue
        s = by_key[key]
        node, chatd = results.median("node", key, name), results.median("chatd", key, name)
        ratio = f"{chatd / node:.2f}×" if node and chatd is not None and "node" in s.servers else "—"
        lines.append(f"| {label} | {cell(results, 'node', key, name, s)} | {cell(results, 'chatd', key, name, s)} | {ratio} |")
    fanouts = [k for k in by_key if k.startswith(("fanout", "rate"))]
    if fanouts:
        lines.append(f"| lost deliveries, all fan-out runs | {results.loss('node')} | {results.loss('chatd')} | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", help="comma-separated scenario keys: " + ", ".join(s.key for s in SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="shorter measuring windows (for trying things out)")
    parser.add_argument("--json", help="also write every run's raw result to this file")
    parser.add_argument(
        "--shared-cookie",
        action="store_true",
        help="every socket of a scenario with one session (one GET /), to tell the cost of sessions apart",
    )
    parser.add_argument("--from-json", help="print the table of an earlier run's --json file instead of running")
    args = parser.parse_args()
    # Stopped from outside: leave through the `finally`s, which stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    scenarios = [s for s in SCENARIOS if not args.only or s.key in args.only.split(",")]
    results = Results()
    if args.from_json:
        for name, runs in json.loads(Path(args.from_json).read_text()).items():
            kind, key = name.split("/", 1)
            for result in runs:
                results.add(kind, key, derived(result))
        print(table(results, [s for s in scenarios if any(k == s.key for _, k in results.runs)]))
        return 0
    started = time.monotonic()
    for repeat in range(args.repeat):
        for scenario in scenarios:
            kinds = scenario.servers if repeat % 2 == 0 else tuple(reversed(scenario.servers))
            for kind in kinds:
                result = run_once(kind, scenario, args.quick, args.shared_cookie)
                results.add(kind, scenario.key, result)
                print(f"[{time.monotonic() - started:5.0f} s] {repeat + 1}/{args.repeat} {scenario.key:<22} {kind:<5} "
                      f"{json.dumps(result)}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k}/{s}": v for (k, s), v in results.runs.items()}, indent=1))
    print(f"\n{args.repeat} runs of each, medians; {time.monotonic() - started:.0f} s in all "
          f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).\n")
    print(table(results, scenarios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
