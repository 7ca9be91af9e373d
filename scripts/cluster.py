"""`make cluster`: two chatd processes as one chat, on loopback, to try with two browser windows.

Starts a throwaway Redis and PostgreSQL, two `python -m chatd` processes sharing
them (and the same fresh secret key), and nginx in front of them
(deploy/nginx-chatd.conf: ip_hash, websocket upgrade) — the same throwaway servers
the tests use (tests/services.py and its users). Prints the URLs; Ctrl-C stops
everything it started, by PID, and removes the temp dirs.

Not part of the chatd package: a developer's tool, run from a checkout.
"""

from __future__ import annotations

import argparse
import os
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
from redis_service import redis_missing, start_redis  # noqa: E402
from services import ChatdProcess  # noqa: E402


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
        started.append(postgres)
        flags = ["--redis-url", redis.url, "--database-url", postgres.url, "--trusted-proxy", "127.0.0.1"]
        # Sessions of their own: Ctrl-C reaches them only through stop().
        processes = [ChatdProcess(*flags, data_dir=directory / name / "data", env=env, new_session=True) for name in "ab"]
        for process in processes:
            started.append(process)
            process.start(timeout=30)
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
            for name, process in zip("ab", processes):
                if process.proc.poll() is not None:
                    print(f"cluster: chatd {name} exited with status {process.proc.returncode}", file=sys.stderr)
                    stop = True
            time.sleep(0.2)
        print("\ncluster: stopping", flush=True)
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        for part in reversed(started):
            part.destroy()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
