"""`make cluster`: two chatd processes as one chat, on loopback, to try with two browser windows.

Starts a throwaway Redis and PostgreSQL, two `python -m chatd` processes sharing
them (and the same fresh secret key), and nginx in front of them
(deploy/nginx-chatd.conf: ip_hash, websocket upgrade) — the same throwaway servers
the tests use (tests/redis_service.py, tests/pg_service.py, tests/nginx_service.py). Prints the URLs; Ctrl-C stops
everything it started, by PID, and removes the temp dirs.

Not part of the chatd package: a developer's tool, run from a checkout.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from nginx_service import nginx_missing, start_nginx  # noqa: E402
from pg_service import find_bin_dir, start_postgres  # noqa: E402
from redis_service import free_port, redis_missing, start_redis  # noqa: E402


class Chatd:
    """One `python -m chatd` process; its log goes to a file in the cluster's temp dir."""

    def __init__(self, name: str, port: int, flags: list[str], env: dict[str, str], directory: Path) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = directory / f"chatd-{name}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatd", "--port", str(port), "--data-dir", str(directory / name), *flags],
                cwd=ROOT,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,  # Ctrl-C reaches it only through stop()
            )

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.1)[0] and "serving on" in self.proc.stdout.readline():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatd {self.name} exited: {self.log_path.read_text()[-2000:]}")
        raise RuntimeError(f"chatd {self.name} did not start within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Throwaway:
    """Something started, with a stop() for the common clean-up."""

    def __init__(self, stop) -> None:
        self.stop = stop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("CLUSTER_PORT", "8800")),
                        help="nginx's port on 127.0.0.1 (default 8800, or CLUSTER_PORT)")  # fmt: skip
    args = parser.parse_args()
    no_postgres = None if find_bin_dir() else "PostgreSQL's initdb/pg_ctl are missing (Debian's postgresql package)"
    for missing in (redis_missing(), nginx_missing(), no_postgres):
        if missing:
            print(f"cluster: {missing}; `make system-deps` as root installs it", file=sys.stderr)
            return 2

    directory = Path(tempfile.mkdtemp(prefix="chatd-cluster-"))
    key = subprocess.run([sys.executable, "-m", "chatd", "keygen"], cwd=ROOT, capture_output=True, text=True, check=True)
    env = {"CHATD_SECRET_KEYS": key.stdout.strip()}
    started: list = []
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis = start_redis()
        started.append(redis)
        postgres = start_postgres()
        started.append(Throwaway(postgres.destroy))
        flags = ["--redis-url", redis.url, "--database-url", postgres.url, "--trusted-proxy", "127.0.0.1"]
        processes = [Chatd(name, free_port(), flags, env, directory) for name in ("a", "b")]
        started.extend(processes)
        for process in processes:
            process.wait_serving()
        nginx = start_nginx([f"127.0.0.1:{p.port}" for p in processes], port=args.port)
        started.append(nginx)
        a, b = processes
        print(
            f"""
chatd cluster: two processes, one Redis ({redis.url}),
one PostgreSQL ({postgres.url}), nginx in front.

  through nginx:   {nginx.url}/
  process a alone: http://127.0.0.1:{a.port}/
  process b alone: http://localhost:{b.port}/   (another host name: its own cookie, so another person)

nginx's ip_hash sends every window of this machine to the same process; open
process a in one window and process b in the other to watch them chat through Redis.
Logs: {directory}
Ctrl-C stops everything.""",
            flush=True,
        )
        while not stop:
            for process in processes:
                if process.proc.poll() is not None:
                    print(f"cluster: chatd {process.name} exited with status {process.proc.returncode}", file=sys.stderr)
                    stop = True
            time.sleep(0.2)
        print("\ncluster: stopping", flush=True)
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        for part in reversed(started):
            part.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
