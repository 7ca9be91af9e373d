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

import pytest
from cryptography.fernet import Fernet

from conftest import Visitor
from services import ChatdProcess
from nginx_service import NginxService, nginx_missing, start_nginx
from pg_service import create_database, drop_database
from redis_service import RedisService, redis_missing, skip_or_fail, start_redis


@dataclass
class Cluster:
    redis: RedisService
    database_url: str
    a: ChatdProcess | None
    b: ChatdProcess | None
    nginx: NginxService | None
    key: str
    more: tuple[ChatdProcess, ...] = ()  # a third process and on, when asked for

    @property
    def processes(self) -> tuple[ChatdProcess, ...]:
        return (self.a, self.b, *self.more)

    def stop(self) -> None:
        """Stop every part there is now (a test may have replaced one, e.g. a restarted Redis)."""
        problems = []
        for part in (self.nginx, *self.processes, self.redis):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # noqa: BLE001 - stop the others first
                    problems.append(exc)
        if problems:
            raise problems[0]


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
    try:
        cluster = Cluster(start_redis(), database_url, None, None, None, key)
        try:
            shared = ["--redis-url", cluster.redis.url, "--database-url", database_url, "--trusted-proxy", "127.0.0.1"]
            env = {"CHATD_SECRET_KEYS": key}
            cluster.a, cluster.b, *more = (
                ChatdProcess(*shared, *flags, data_dir=root / name / "data", env=env) for name in "abcdefgh"[:processes]
            )
            cluster.more = tuple(more)
            for process in cluster.processes:
                process.start()
            cluster.nginx = start_nginx([f"127.0.0.1:{p.port}" for p in cluster.processes], balance=balance)
            yield cluster
        finally:
            cluster.stop()
    finally:
        drop_database(pg_server_url, database)


@pytest.fixture
async def visitors():
    """`await visitors(url)` makes a visitor of one of the cluster's processes; all are closed
    afterwards. (conftest's `visitors` would start the default server for nothing.)"""
    made: list[Visitor] = []

    async def make(url: str) -> Visitor:
        visitor = Visitor(url)
        made.append(visitor)
        return visitor

    yield make
    for visitor in made:
        await visitor.close()
