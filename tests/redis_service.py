"""A throwaway redis-server (Debian's package) for tests and `make cluster`.

`start_redis()` runs one in a temp dir on a free loopback port, with no
persistence, and returns a `RedisService` (its `url`, and `stop()`, which ends
exactly that process by its PID and removes the dir; see services.py). The
`redis_url` fixture does both around a test; without redis-server the test skips
(fails under CI=true).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from services import Service, free_port, skip_or_fail  # noqa: F401 (free_port, skip_or_fail: for importers)

REDIS_SERVER = Path(os.environ.get("CHATD_REDIS_SERVER", "/usr/bin/redis-server"))


class RedisService(Service):
    name = "redis-server"
    remove_on_stop = True

    def __init__(self, port: int | None = None) -> None:
        port = port or free_port()
        directory = Path(tempfile.mkdtemp(prefix="chatd-redis-"))
        self.url = f"redis://127.0.0.1:{port}/0"
        command = [
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
        super().__init__(command, port=port, directory=directory, log_path=directory / "redis.log")


def redis_missing() -> str | None:
    """Why a throwaway Redis cannot run here, or None."""
    if not os.access(REDIS_SERVER, os.X_OK):
        return f"{REDIS_SERVER} is missing (Debian's redis-server package)"
    return None


def start_redis(port: int | None = None) -> RedisService:
    return RedisService(port).start()


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
