"""A throwaway redis-server (Debian's package) for tests and `make cluster`.

`start_redis()` runs one in a temp dir on a free loopback port, with no
persistence, and returns a `RedisService` (its `url`, and `stop()`, which ends
exactly that process by its PID and removes the dir). The `redis_url` fixture
does both around a test; without redis-server the test skips (fails under CI=true).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

REDIS_SERVER = Path(os.environ.get("CHATD_REDIS_SERVER", "/usr/bin/redis-server"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


@dataclass
class RedisService:
    url: str
    port: int
    directory: Path
    proc: subprocess.Popen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def redis_missing() -> str | None:
    """Why a throwaway Redis cannot run here, or None."""
    if not os.access(REDIS_SERVER, os.X_OK):
        return f"{REDIS_SERVER} is missing (Debian's redis-server package)"
    return None


def start_redis(port: int | None = None) -> RedisService:
    port = port or free_port()
    directory = Path(tempfile.mkdtemp(prefix="chatd-redis-"))
    args = [
        str(REDIS_SERVER),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--save", "",  # no snapshots: nothing outlives the run
        "--appendonly", "no",
        "--daemonize", "no",
        "--logfile", str(directory / "redis.log"),
        "--protected-mode", "yes",
    ]  # fmt: skip
    # A session of its own: a Ctrl-C meant for `make cluster` reaches it only through stop().
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    service = RedisService(f"redis://127.0.0.1:{port}/0", port, directory, proc)
    try:
        wait_for_port(port, proc, "redis-server")
    except Exception:
        log = directory / "redis.log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        service.stop()
        raise RuntimeError(f"redis-server did not start: {detail}") from None
    return service


def skip_or_fail(reason: str) -> None:
    """A missing server: a loud skip, or a failure under CI=true."""
    message = f"CLUSTER TESTS NOT RUN: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing server is a failure)", pytrace=False)
    warnings.warn(message, UserWarning, stacklevel=2)
    pytest.skip(message)


@pytest.fixture
def redis_service():
    missing = redis_missing()
    if missing:
        skip_or_fail(missing + " — `make system-deps` as root installs it")
    service = start_redis()
    yield service
    service.stop()


@pytest.fixture
def redis_url(redis_service: RedisService) -> str:
    return redis_service.url
