"""A throwaway PostgreSQL for tests: Debian's initdb + postgres in a temp dir, on a free port (services.py).

Reusable outside pytest:

    server = start_postgres()          # or PgServer(...).start()
    url = server.url                   # postgresql://postgres@127.0.0.1:PORT/postgres
    server.stop(); server.start()      # the same cluster again (a database that goes away and comes back)
    server.destroy()                   # stop and remove the temp dir

and as pytest fixtures (import them into a conftest.py): `pg_server` (session-wide,
or the server named by CHATD_TEST_DATABASE_URL) and `pg_database_url` (a fresh, empty
database per test). As root the server runs as the `postgres` user (initdb refuses root).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from yarl import URL

from services import Service, free_port

ENV_URL = "CHATD_TEST_DATABASE_URL"


def find_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL bin dir, or a PATH one that has pg_ctl."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for path in reversed(candidates):
        if Path(path, "pg_ctl").exists():
            return Path(path)
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


class PgServer(Service):
    """`postgres -D data` in the foreground (as the `postgres` user when we are root: initdb
    refuses root), ready when its postmaster.pid says so."""

    name = "PostgreSQL"
    stop_signal = signal.SIGINT  # "fast" shutdown: ends open connections, then stops

    def __init__(self, *, fsync: bool = False, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        if self.bin_dir is None:
            raise RuntimeError("PostgreSQL's initdb/pg_ctl not found (Debian package postgresql)")
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="chatd-pg-"))
        self.data = self.root / "data"
        user = "postgres" if os.geteuid() == 0 else None
        if user:
            pw = pwd.getpwnam(user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        super().__init__([str(self.bin_dir / "postgres"), "-D", str(self.data)], port=free_port(),
                         directory=self.root, log_path=self.root / "log", cwd=self.root, user=user)  # fmt: skip
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")  # fmt: skip
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "on" if fsync else "off",
            "synchronous_commit": "on",
            "full_page_writes": "on" if fsync else "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "logging_collector": "off",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([str(self.bin_dir / tool), *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.root, **self._as_user())  # fmt: skip

    def ready(self) -> bool:
        """postmaster.pid's 8th line is the server's status: "ready" once it accepts connections."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"


def start_postgres(*, fsync: bool = False) -> PgServer:
    """A running throwaway server; call .destroy() when done."""
    server = PgServer(fsync=fsync)
    try:
        return server.start()
    except BaseException:
        shutil.rmtree(server.root, ignore_errors=True)
        raise


async def _admin(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _run_apart(coroutine) -> None:
    """Run in a thread of its own: callable from sync code and from inside a running loop
    alike, and never touches the loop pytest's fixtures use."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE name on the server; its URL."""
    _run_apart(_admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE template0'))
    return str(URL(server_url).with_path("/" + name))


def drop_database(server_url: str, name: str) -> None:
    _run_apart(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- pytest fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server():
    """The URL of a PostgreSQL server for the whole session (admin database), and the
    PgServer (None when CHATD_TEST_DATABASE_URL names an existing one)."""
    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL], None
        return
    if find_bin_dir() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed (make system-deps)")
        pytest.skip("PostgreSQL is not installed (make system-deps)")
    server = start_postgres()
    try:
        yield server.url, server
    finally:
        server.destroy()


_numbers = itertools.count(1)


@pytest.fixture
def pg_database_url(pg_server):
    """A fresh empty database for one test; dropped afterwards."""
    server_url, _ = pg_server
    name = f"chatd_test_{os.getpid()}_{next(_numbers)}"
    url = create_database(server_url, name)
    yield url
    drop_database(server_url, name)
