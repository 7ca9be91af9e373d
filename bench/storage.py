"""Messages stored per second, durably (SQLite synchronous=FULL; PostgreSQL fsync=on,
synchronous_commit=on), on the message path chatd uses: `add_message` from many
concurrent senders into a few rooms.

    .venv/bin/python bench/storage.py [--messages 4000] [--writers 50] [--database-url URL]

Without --database-url a throwaway PostgreSQL (tests/pg_service.py, fsync on) is
started in a temp dir. Rows:

- sqlite / postgres-asyncpg: chatd's own SqliteStorage / PostgresStorage (group commit);
- postgres-psycopg: the same statement and group commit through psycopg 3 + psycopg-pool
  (skipped when psycopg is not installed), to compare the drivers;
- "one txn per message" rows: no group commit, each message its own commit through
  the driver's pool: the raw driver cost, and what group commit saves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from chatd.storage.group_commit import GroupCommit  # noqa: E402
from chatd.storage.postgres import INSERT_BATCH, PostgresStorage  # noqa: E402
from chatd.storage.sqlite import SqliteStorage  # noqa: E402

ROOMS = ["general", "dev", "random", "ops"]


async def drive(add, messages: int, writers: int) -> float:
    """`writers` senders, each awaiting its ack before sending the next; messages/s."""
    per_writer = messages // writers

    async def writer(w: int) -> None:
        room = ROOMS[w % len(ROOMS)]
        for i in range(per_writer):
            await add(room, f"writer-{w}", None, f"message {i} from {w}", time.time())

    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return per_writer * writers / (time.perf_counter() - start)


async def bench_storage(storage, messages: int, writers: int) -> float:
    await storage.open()
    try:
        return await drive(storage.add_message, messages, writers)
    finally:
        await storage.close()


async def fresh_database(admin_url: str, name: str) -> str:
    import asyncpg
    from yarl import URL

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await conn.close()
    url = str(URL(admin_url).with_path("/" + name))
    storage = PostgresStorage(url)  # creates the schema
    await storage.open()
    await storage.close()
    return url


def _columns(batch: list[dict]) -> tuple:
    return (
        [m["room"] for m in batch], [m["name"] for m in batch], [m["account"] for m in batch],
        [m["msg"].encode() for m in batch], [m["ts"] for m in batch], [m.get("author") for m in batch],
    )  # fmt: skip


async def bench_asyncpg_per_message(url: str, messages: int, writers: int) -> float:
    import asyncpg

    pool = await asyncpg.create_pool(url, min_size=10, max_size=10)

    async def add(room, name, account, msg, ts):
        batch = [{"room": room, "name": name, "account": account, "msg": msg, "ts": ts}]
        async with pool.acquire() as conn:
            await conn.fetch(INSERT_BATCH, *_columns(batch))

    try:
        return await drive(add, messages, writers)
    finally:
        await pool.close()


PSYCOPG_SQL = INSERT_BATCH.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s").replace("$4", "%s")
PSYCOPG_SQL = PSYCOPG_SQL.replace("$5", "%s").replace("$6", "%s")


async def _psycopg_pool(url: str):
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(url, min_size=10, max_size=10, open=False, kwargs={"autocommit": True})
    await pool.open(wait=True)
    return pool


async def bench_psycopg_group_commit(url: str, messages: int, writers: int) -> float:
    pool = await _psycopg_pool(url)

    async def write_batch(batch: list[dict]) -> list[dict]:
        async with pool.connection() as conn:
            cur = await conn.execute(PSYCOPG_SQL, _columns(batch))
            await cur.fetchall()
        return batch

    group = GroupCommit(write_batch)

    async def add(room, name, account, msg, ts):
        return await group.submit({"room": room, "name": name, "account": account, "msg": msg, "ts": ts})

    try:
        return await drive(add, messages, writers)
    finally:
        await pool.close()


async def bench_psycopg_per_message(url: str, messages: int, writers: int) -> float:
    pool = await _psycopg_pool(url)

    async def add(room, name, account, msg, ts):
        batch = [{"room": room, "name": name, "account": account, "msg": msg, "ts": ts}]
        async with pool.connection() as conn:
            cur = await conn.execute(PSYCOPG_SQL, _columns(batch))
            await cur.fetchall()

    try:
        return await drive(add, messages, writers)
    finally:
        await pool.close()


async def main(args) -> None:
    try:
        import psycopg_pool  # noqa: F401
    except ImportError:
        have_psycopg = False
    else:
        have_psycopg = True
    results: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(("sqlite (group commit, synchronous=FULL)",
                        await bench_storage(SqliteStorage(Path(tmp) / "chatd.sqlite3"), args.messages, args.writers)))  # fmt: skip
    server = None
    admin_url = args.database_url
    if admin_url is None:
        from pg_service import start_postgres

        server = await asyncio.to_thread(start_postgres, fsync=True)
        admin_url = server.url
    try:
        for round_ in range(args.rounds):
            url = await fresh_database(admin_url, "chatd_bench")
            results.append(("postgres-asyncpg (group commit, chatd's PostgresStorage)",
                            await bench_storage(PostgresStorage(url), args.messages, args.writers)))  # fmt: skip
            if have_psycopg:
                url = await fresh_database(admin_url, "chatd_bench")
                results.append(("postgres-psycopg (group commit, same SQL)",
                                await bench_psycopg_group_commit(url, args.messages, args.writers)))  # fmt: skip
            url = await fresh_database(admin_url, "chatd_bench")
            results.append(("postgres-asyncpg (one txn per message, pool of 10)",
                            await bench_asyncpg_per_message(url, args.messages, args.writers)))  # fmt: skip
            if have_psycopg:
                url = await fresh_database(admin_url, "chatd_bench")
                results.append(("postgres-psycopg (one txn per message, pool of 10)",
                                await bench_psycopg_per_message(url, args.messages, args.writers)))  # fmt: skip
    finally:
        if server is not None:
            await asyncio.to_thread(server.destroy)
    print(f"{args.messages} messages, {args.writers} concurrent writers, {len(ROOMS)} rooms; messages/s stored:")
    for name, rate in results:
        print(f"  {name:58} {rate:8.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="PostgreSQL rows are measured this many times")
    parser.add_argument("--database-url", help="an existing PostgreSQL server (admin URL; a database chatd_bench is made)")
    asyncio.run(main(parser.parse_args()))
