"""Two `python -m chatd` processes as one chat, for the cluster tests: a throwaway
Redis, one fresh database on the tests' throwaway PostgreSQL (tests/pg_service.py),
the same CHATD_SECRET_KEYS, and a throwaway nginx in front (tests/nginx_service.py).

    with running_cluster(root, pg_server_url, "--chat-rate", "0") as cluster:
        cluster.a.url, cluster.b.url, cluster.nginx.url, cluster.database_url, …

Missing redis-server or nginx: a loud skip, or a failure under CI=true.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cryptography.fernet import Fernet

from conftest import ChatdProcess
from nginx_service import NginxService, nginx_missing, start_nginx
from pg_service import create_database, drop_database
from redis_service import RedisService, redis_missing, skip_or_fail, start_redis


@dataclass
class Cluster:
    redis: RedisService
    database_url: str
    a: ChatdProcess
    b: ChatdProcess
    nginx: NginxService
    key: str
    more: tuple[ChatdProcess, ...] = ()  # a third process and on, when asked for

    @property
    def processes(self) -> tuple[ChatdProcess, ...]:
        return (self.a, self.b, *self.more)


_numbers = itertools.count(1)


@contextlib.contextmanager
def running_cluster(
    root: Path, pg_server_url: str, *flags: str, balance: str | None = None, processes: int = 2
) -> Iterator[Cluster]:
    """Start everything (`processes` chatds, each with `flags`, plus the shared URLs); stop it all afterwards.

    `balance`: nginx's balancing line instead of ip_hash (see nginx_service.server_block).
    """
    for missing in (redis_missing(), nginx_missing()):
        if missing:
            skip_or_fail(missing + " — `make system-deps` as root installs it")
    key = Fernet.generate_key().decode("ascii")
    database = f"chatd_cluster_{os.getpid()}_{next(_numbers)}"
    database_url = create_database(pg_server_url, database)
    redis = start_redis()
    started: list = [redis]
    try:
        shared = ["--redis-url", redis.url, "--database-url", database_url, "--trusted-proxy", "127.0.0.1"]
        chatds = [
            ChatdProcess(*shared, *flags, data_dir=root / name / "data", env={"CHATD_SECRET_KEYS": key})
            for name in "abcdefgh"[:processes]
        ]
        for process in chatds:
            process.start()
            started.append(process)
        nginx = start_nginx([f"127.0.0.1:{p.port}" for p in chatds], balance=balance)
        started.append(nginx)
        yield Cluster(redis, database_url, chatds[0], chatds[1], nginx, key, tuple(chatds[2:]))
    finally:
        for part in reversed(started):
            part.stop()
        drop_database(pg_server_url, database)
